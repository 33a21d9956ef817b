import base64
import io

from PIL import Image

from tests.conftest import Gateway


async def test_sdk_generates_b64_and_url(gateway: Gateway) -> None:
    client = gateway.client()
    result = await client.images.generate(prompt="a lighthouse", model="gpt-image-1", size="1024x1536",
                                          output_format="webp", response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.size == (1024, 1536) and image.format == "WEBP"
    result = await client.images.generate(prompt="a lighthouse", size="256x256", response_format="url", n=2)
    assert len(result.data) == 2 and result.data[0].url
