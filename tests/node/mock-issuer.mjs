// An independent OIDC issuer for the tests: the npm package oauth2-mock-server.
// Usage: node mock-issuer.mjs [RS256|ES256]; prints {"url": ...} once listening.
// POST /token (grant_type=client_credentials, aud=..., email=...) returns a signed JWT.
import { OAuth2Server } from "oauth2-mock-server";

const alg = process.argv[2] ?? "RS256";
const server = new OAuth2Server();
await server.issuer.keys.generate(alg);
server.service.on("beforeTokenSigning", (token, req) => {
  const { email } = req.body;
  if (email) {
    token.payload.sub = `mock|${email}`;
    token.payload.email = email;
    token.payload.email_verified = true;
  }
});
await server.start(0, "127.0.0.1");
console.log(JSON.stringify({ url: server.issuer.url }));
const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
