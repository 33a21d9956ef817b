// Swagger UI on the gateway's own document; "Try it out" calls this gateway.
window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
});
