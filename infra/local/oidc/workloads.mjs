// Workload identities for the local Entra ID stand-in (server.mjs): app-only access tokens the way
// Entra ID issues them, for the three ways a machine signs in without a person:
//
//  * client credentials with a certificate (a service principal): POST /<tid>/oauth2/v2.0/token with
//    grant_type=client_credentials, client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
//    and a client_assertion signed by the app's registered certificate (header x5t or x5t#S256), aud =
//    the token endpoint, iss = sub = the client id. A client secret (client_secret) works too.
//  * workload identity federation (GitHub Actions, Kubernetes): the same call with a client_assertion
//    issued by a trusted external issuer; checked as Entra checks a federated credential: the issuer,
//    the subject and the audience (api://AzureADTokenExchange) must match one of the app's federated
//    credentials exactly, and the token must verify against that issuer's keys and be unexpired.
//    A dev "CI" issuer lives at https://127.0.0.1:<port>/ci: discovery, JWKS, and POST /ci/token (the
//    CI system's own call, guarded by a bearer secret like GitHub's ACTIONS_ID_TOKEN_REQUEST_TOKEN)
//    that mints such a token for a given subject and audience.
//  * managed identity: the App Service protocol (GET <IDENTITY_ENDPOINT>?resource=...&api-version=2019-08-01
//    with the header X-IDENTITY-HEADER), served over plain http on loopback as on App Service, on
//    its own port (--mi-port); azure-identity's ManagedIdentityCredential finds it through the
//    IDENTITY_ENDPOINT / IDENTITY_HEADER environment variables. `client_id` selects a user-assigned one.
//
// MSAL (inside azure-identity) reaches the token endpoint through the Entra-style discovery document
// at /<tid>/v2.0/.well-known/openid-configuration (authority https://127.0.0.1:<port>/<tid>, instance
// discovery off). Tokens look like Entra v2 app-only tokens: idtyp "app", oid = sub = the service
// principal's object id, azp = the client id, roles = its app roles (no `roles` claim when it has
// none), no scp; aud = the API's client id. The only scope accepted is <app id uri>/.default.

import { constants, createPrivateKey, createSign, createVerify, generateKeyPairSync, randomBytes, X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const JWT_BEARER = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
export const FEDERATION_AUDIENCE = 'api://AzureADTokenExchange';
const TOKEN_TTL = 3600;
const SKEW = 300;

const b64url = (buf) => Buffer.from(buf).toString('base64url');
const b64json = (obj) => b64url(JSON.stringify(obj));

function decodeJwt(token) {
  const parts = String(token ?? '').split('.');
  if (parts.length !== 3) throw new Error('not a JWT');
  return {
    header: JSON.parse(Buffer.from(parts[0], 'base64url').toString('utf8')),
    payload: JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8')),
    signed: `${parts[0]}.${parts[1]}`,
    signature: Buffer.from(parts[2], 'base64url'),
  };
}

function signJwt(header, payload, privateKey) {
  const signed = `${b64json(header)}.${b64json(payload)}`;
  const sig = createSign('RSA-SHA256').update(signed).sign(privateKey);
  return `${signed}.${b64url(sig)}`;
}

// RS256, or PS256 (what MSAL signs certificate assertions with when it sends x5t#S256).
function verifyJwt(jwt, publicKey) {
  const v = createVerify('RSA-SHA256').update(jwt.signed);
  if (jwt.header.alg === 'RS256') return v.verify(publicKey, jwt.signature);
  if (jwt.header.alg === 'PS256') {
    return v.verify({ key: publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }, jwt.signature);
  }
  return false;
}

// A form body of at most `limit` bytes (server.mjs's interaction pages use it too).
export async function readForm(req, limit = 64 * 1024) {
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function json(res, status, body) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(JSON.stringify(body));
}

// Entra's error shape: { error, error_description: "AADSTSxxxxx: ..." }
const oauthError = (res, status, error, code, text) => json(res, status, {
  error, error_description: `${code}: ${text}`, error_codes: [Number(code.slice(6))],
});

export function makeWorkloads({ base, config, jwks, stateDir, log }) {
  const API = config.api;
  const signingJwk = jwks.keys[0];
  const signingKey = createPrivateKey({ key: signingJwk, format: 'jwk' });
  const ciIssuer = `${base}/ci`;
  const ci = config.ci ?? {};
  // The CI issuer's own signing key: made per run (its tokens live minutes).
  const { privateKey: ciKey, publicKey: ciPublic } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ciKid = b64url(randomBytes(12));
  const issuers = { ci: { issuer: ciIssuer, key: ciPublic } };

  // apps by tenant and client id
  const apps = new Map(); // `${tid}:${client_id}` -> app
  for (const [tid, tenant] of Object.entries(config.tenants)) {
    for (const a of tenant.apps ?? []) apps.set(`${tid.toLowerCase()}:${a.client_id}`, { ...a, tid: tid.toLowerCase() });
  }

  function certificateOf(app) {
    // The app's registered certificate: a PEM the local stack writes into the state directory
    // (devstack/oidc.py), as an admin uploads one to the app registration.
    if (!app.certificate) return undefined;
    const file = path.join(stateDir, 'oidc', 'app-certs', `${app.client_id}.pem`);
    if (!existsSync(file)) return undefined;
    return new X509Certificate(readFileSync(file));
  }

  function appToken(app, how) {
    const now = Math.floor(Date.now() / 1000);
    const payload = {
      aud: API.client_id,
      iss: `${base}/${app.tid}`,
      iat: now,
      nbf: now,
      exp: now + TOKEN_TTL,
      azp: app.client_id,
      azpacr: how,
      idtyp: 'app',
      oid: app.oid,
      sub: app.oid,
      tid: app.tid,
      uti: b64url(randomBytes(12)),
      ver: '2.0',
    };
    if (app.roles?.length) payload.roles = [...app.roles];
    return signJwt({ alg: 'RS256', typ: 'JWT', kid: signingJwk.kid }, payload, signingKey);
  }

  function scopeOk(scope) {
    const want = [`${API.app_id_uri}/.default`, `${API.client_id}/.default`];
    return String(scope ?? '').split(' ').filter(Boolean).some((s) => want.includes(s));
  }

  // Checks a client assertion: the app's own certificate, or a federated credential. Returns
  // "2" (certificate/assertion, Entra's azpacr) or throws with an AADSTS-like message.
  function checkAssertion(app, assertion, tokenEndpoint) {
    let jwt;
    try { jwt = decodeJwt(assertion); } catch { throw new Error('AADSTS50027: Invalid JWT token.'); }
    const now = Math.floor(Date.now() / 1000);
    const p = jwt.payload;
    if (typeof p.exp !== 'number' || p.exp + SKEW < now) throw new Error('AADSTS700024: Client assertion is not within its valid time range.');
    if (typeof p.nbf === 'number' && p.nbf - SKEW > now) throw new Error('AADSTS700024: Client assertion is not within its valid time range.');
    // federated credential?
    for (const fc of app.federated ?? []) {
      const issuer = issuers[fc.issuer]?.issuer ?? fc.issuer;
      if (p.iss !== issuer) continue;
      const key = issuers[fc.issuer]?.key;
      if (!key || !verifyJwt(jwt, key)) throw new Error('AADSTS700211: No matching federated identity record found for presented assertion issuer (signature).');
      const aud = Array.isArray(p.aud) ? p.aud : [p.aud];
      if (p.sub !== fc.subject) throw new Error(`AADSTS700213: No matching federated identity record found for presented assertion subject '${p.sub}'.`);
      if (!aud.includes(fc.audience ?? FEDERATION_AUDIENCE)) throw new Error('AADSTS700212: No matching federated identity record found for presented assertion audience.');
      return '2';
    }
    if ((app.federated ?? []).length && !certificateOf(app)) {
      throw new Error(`AADSTS700211: No matching federated identity record found for presented assertion issuer '${p.iss}'.`);
    }
    const cert = certificateOf(app);
    if (!cert) throw new Error('AADSTS700027: The certificate with identifier used to sign the client assertion is not registered on application.');
    const x5t = String(jwt.header['x5t#S256'] ?? jwt.header.x5t ?? '').replace(/=+$/, ''); // MSAL pads
    const thumbs = [b64url(Buffer.from(cert.fingerprint.replace(/:/g, ''), 'hex')),
      b64url(Buffer.from(cert.fingerprint256.replace(/:/g, ''), 'hex'))];
    if (!thumbs.includes(x5t)) throw new Error('AADSTS700027: The certificate with identifier used to sign the client assertion is not registered on application.');
    if (!verifyJwt(jwt, cert.publicKey)) throw new Error('AADSTS700027: Client assertion failed signature validation.');
    if (p.iss !== app.client_id || p.sub !== app.client_id) throw new Error('AADSTS700023: Client assertion audience claim does not match.');
    const aud = Array.isArray(p.aud) ? p.aud : [p.aud];
    if (!aud.some((a) => String(a).replace(/\/$/, '') === tokenEndpoint)) {
      throw new Error('AADSTS700016: Client assertion audience claim does not match the token endpoint.');
    }
    return '2';
  }

  async function token(req, res, tid) {
    if (req.method !== 'POST') return oauthError(res, 405, 'invalid_request', 'AADSTS900561', 'The endpoint only accepts POST requests.');
    let form;
    try { form = await readForm(req); } catch { return oauthError(res, 400, 'invalid_request', 'AADSTS90014', 'Request body too large.'); }
    if (form.get('grant_type') !== 'client_credentials') {
      return oauthError(res, 400, 'unsupported_grant_type', 'AADSTS70003', 'This endpoint serves only the client_credentials grant.');
    }
    let clientId = form.get('client_id');
    let secret = form.get('client_secret');
    const basic = /^Basic (.+)$/i.exec(req.headers.authorization ?? '');
    if (basic) {
      const [id, s] = Buffer.from(basic[1], 'base64').toString('utf8').split(':');
      clientId = decodeURIComponent(id);
      secret = decodeURIComponent(s ?? '');
    }
    const app = apps.get(`${tid}:${clientId}`);
    if (!app) return oauthError(res, 400, 'unauthorized_client', 'AADSTS700016', `Application with identifier '${clientId}' was not found in the directory.`);
    if (!scopeOk(form.get('scope'))) {
      return oauthError(res, 400, 'invalid_scope', 'AADSTS1002012', 'The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.');
    }
    let how;
    if (form.get('client_assertion_type') === JWT_BEARER && form.get('client_assertion')) {
      try {
        how = checkAssertion(app, form.get('client_assertion'), `${base}/${tid}/oauth2/v2.0/token`);
      } catch (err) {
        log(`[workload] assertion refused for ${app.name}: ${err.message}`);
        return json(res, 401, { error: 'invalid_client', error_description: err.message });
      }
    } else if (secret !== null && secret !== undefined) {
      if (!app.secret || secret !== app.secret) {
        log(`[workload] secret refused for ${app.name}`);
        return oauthError(res, 401, 'invalid_client', 'AADSTS7000215', 'Invalid client secret provided.');
      }
      how = '1';
    } else {
      return oauthError(res, 401, 'invalid_client', 'AADSTS7000218', "The request body must contain 'client_assertion' or 'client_secret'.");
    }
    log(`[workload] app token issued for ${app.name} (${how === '1' ? 'secret' : 'assertion'})`);
    return json(res, 200, { token_type: 'Bearer', expires_in: TOKEN_TTL, ext_expires_in: TOKEN_TTL, access_token: appToken(app, how) });
  }

  function discovery(tid) {
    const issuer = `${base}/${tid}`;
    return {
      issuer,
      token_endpoint: `${issuer}/oauth2/v2.0/token`,
      authorization_endpoint: `${issuer}/oauth2/v2.0/authorize`,
      jwks_uri: `${issuer}/jwks`,
      token_endpoint_auth_methods_supported: ['client_secret_post', 'private_key_jwt', 'client_secret_basic'],
      response_types_supported: ['code'],
      subject_types_supported: ['pairwise'],
      id_token_signing_alg_values_supported: ['RS256'],
      tenant_region_scope: null,
    };
  }

  // Handles the tenant routes it owns; false for everything else (oidc-provider's).
  async function handleTenant(req, res, tid, rest) {
    const p = rest.split('?')[0];
    if (p === '/v2.0/.well-known/openid-configuration') { json(res, 200, discovery(tid)); return true; }
    if (p === '/oauth2/v2.0/token') { await token(req, res, tid); return true; }
    return false;
  }

  // The dev CI issuer (what GitHub's token.actions.githubusercontent.com is to Entra).
  async function handleCi(req, res, rest) {
    const p = rest.split('?')[0];
    if (p === '/.well-known/openid-configuration') {
      return json(res, 200, { issuer: ciIssuer, jwks_uri: `${ciIssuer}/jwks`, subject_types_supported: ['public'],
        response_types_supported: ['id_token'], id_token_signing_alg_values_supported: ['RS256'] });
    }
    if (p === '/jwks') {
      return json(res, 200, { keys: [{ ...ciPublic.export({ format: 'jwk' }), kid: ciKid, alg: 'RS256', use: 'sig' }] });
    }
    if (p === '/token' && req.method === 'POST') {
      if (!ci.request_token || req.headers.authorization !== `Bearer ${ci.request_token}`) {
        return json(res, 401, { message: 'Bad credentials' });
      }
      let form;
      try { form = await readForm(req); } catch { return json(res, 400, { message: 'body too large' }); }
      const subject = form.get('subject');
      if (!subject) return json(res, 400, { message: 'subject is required' });
      const now = Math.floor(Date.now() / 1000);
      const value = signJwt({ alg: 'RS256', typ: 'JWT', kid: ciKid }, {
        iss: ciIssuer, sub: subject, aud: form.get('audience') || FEDERATION_AUDIENCE,
        iat: now, nbf: now, exp: now + Number(form.get('lifetime') || 300), jti: b64url(randomBytes(12)),
      }, ciKey);
      return json(res, 200, { value });
    }
    return json(res, 404, { message: 'Not Found' });
  }

  // The App Service managed identity endpoint (http, loopback, its own port).
  function managedIdentityServer(port) {
    const mi = config.managed_identity ?? {};
    const server = http.createServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://127.0.0.1');
      if (url.pathname !== '/msi/token' || req.method !== 'GET') return json(res, 404, { error: 'not found' });
      if (!mi.header || req.headers['x-identity-header'] !== mi.header) {
        return json(res, 401, { statusCode: 401, message: 'Unauthorized: the X-IDENTITY-HEADER is missing or wrong.' });
      }
      if (url.searchParams.get('api-version') !== '2019-08-01') return json(res, 400, { error: 'unsupported api-version' });
      const resource = url.searchParams.get('resource') ?? '';
      if (![API.app_id_uri, API.client_id].includes(resource.replace(/\/$/, ''))) {
        return json(res, 400, { statusCode: 400, message: `AADSTS500011: The resource principal named ${resource} was not found.` });
      }
      const want = url.searchParams.get('client_id') ?? mi.default_client_id;
      const app = [...apps.values()].find((a) => a.managed_identity && a.client_id === want);
      if (!app) return json(res, 400, { statusCode: 400, message: `No managed identity with client id ${want} is assigned to this resource.` });
      const now = Math.floor(Date.now() / 1000);
      log(`[workload] managed identity token issued for ${app.name}`);
      return json(res, 200, { access_token: appToken(app, '2'), expires_on: String(now + TOKEN_TTL),
        resource, token_type: 'Bearer', client_id: app.client_id });
    });
    server.listen(port, '127.0.0.1', () => log(`managed identity endpoint on http://127.0.0.1:${port}/msi/token`));
    return server;
  }

  return { handleTenant, handleCi, managedIdentityServer };
}
