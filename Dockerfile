# imagegw: one image for the front end (`serve`, the default) and the workers (`worker`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMAGEGW_HOST=0.0.0.0 \
    IMAGEGW_DATA_DIR=/data

# every dependency ships as a wheel for this platform: no compiler, and the sources leave with the layer
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY workers /src/workers
RUN pip install /src && rm -rf /src \
    && useradd --system --uid 10001 --home-dir /home/imagegw --create-home imagegw \
    && mkdir -p /data /etc/imagegw && chown imagegw /data

USER imagegw
WORKDIR /home/imagegw
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["imagegw"]
CMD ["serve"]
