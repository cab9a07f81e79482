// Local Entra ID stand-in for ezssh: one real `oidc-provider` (v9) per dev tenant, all behind one
// HTTPS listener on 127.0.0.1. Issuer of tenant T: https://127.0.0.1:<port>/<T> (no trailing slash).
//
// Usage: node infra/local/oidc/server.mjs [--port N] [--state-dir DIR] [--cert PEM] [--key PEM]
//                                         [--users JSON] [--poll-interval S]
// Env fallbacks: OIDC_PORT (8443), OIDC_STATE_DIR (<repo>/.local/devstack), OIDC_TLS_CERT
// (<state>/tls/server.pem), OIDC_TLS_KEY (<state>/tls/server.key), OIDC_USERS (users.json next to
// this file), OIDC_POLL_INTERVAL (1), OIDC_DEBUG=1 logs every request.
// State kept in <state>/oidc/: jwks.json (RS256 signing key), cookie-keys.json and store-<tid>.json
// (grants, sessions, refresh tokens), so tokens and MSAL caches survive a restart of the stack.
//
// What surprised us about MSAL (Python 1.3x) + oidc-provider 9, and what this file does about it:
//  1. MSAL never sends `resource`; it sends `scope=api://ezssh/access_as_user openid profile
//     offline_access`. Without a resource oidc-provider silently drops every non-OIDC scope and
//     issues an opaque userinfo-only token. `defaultResource` maps an `api://ezssh/...` scope to the
//     resource `api://ezssh`, and `useGrantedResource` returns true: otherwise the token endpoint
//     ignores the device code's resource whenever `openid` was requested and userinfo is enabled.
//  2. `profile` must be a known scope (it is, through `claims.profile`), or it is dropped at the
//     device authorization and the later refresh (MSAL re-sends `profile`) fails with
//     "refresh token missing requested scope".
//  3. oidc-provider's device authorization response has no `interval` and no `message`. MSAL then
//     polls every 5 s and `flow["message"]` is missing (Entra always sends one). Both are added here;
//     the interval defaults to 1 s (Entra: 5 s) to keep logins fast.
//  4. MSAL derives the account from `client_info` (Entra returns it because MSAL sends
//     client_info=1); without it MSAL falls back to the ID token `sub`. We add
//     client_info = base64url({"uid": oid, "utid": tid}) so home_account_id is "<oid>.<tid>" as with Entra.
//  5. Use `oidc_authority=<issuer>` in MSAL, never `authority=`: with `authority` MSAL does instance
//     discovery against login.microsoftonline.com. MSAL accepts the issuer because it equals the
//     authority exactly; the tenant ("realm") MSAL records is the first path segment = tid.
//  6. Several providers on one host share the browser's cookie jar (cookies ignore ports), so each
//     tenant gets its own cookie names and the path /<tid>.
//  7. Mounting: oidc-provider derives endpoint URLs from req.originalUrl minus req.url, so the
//     prefix /<tid> is stripped from req.url and the full URL kept in req.originalUrl. The interaction
//     URL must be absolute (/<tid>/interaction/<uid>): its cookie path is resolved against the issuer.
//  8. Access tokens look like Entra v2 ones: typ "JWT" (oidc-provider would write "at+jwt"),
//     aud = API client id, scp = "access_as_user" (short name), azp, ver "2.0", tid, oid, and a `sub`
//     that is NOT the oid (pairwise per tenant+API, as in Entra). Empty `groups`/`roles` are omitted,
//     as Entra does; consumers must treat a missing claim as an empty list.
//  9. `ezssh login --browser` (MSAL acquire_token_interactive) uses the authorization code grant with
//     PKCE (S256) and redirect_uri http://localhost:<ephemeral port> (RFC 8252 loopback), with
//     response_mode=form_post (MSAL's listener refuses query responses). oidc-provider 9 matches
//     loopback redirect URIs of `native` clients ignoring the port, so registering
//     http://localhost (and 127.0.0.1, [::1]) without a port accepts every port, as Entra does.
//     Consent is granted without a page (admin consent), as for the device flow.
// 10. A user's "claims" in users.json (acct, idp, upn: how Entra marks guests) are copied into the
//     access token as they are, so tests get guest and second-domain tokens from the real provider.
// 11. The web page (/app/ on the API's origin) signs in with the same client, as a single-page app:
//     authorization code + PKCE from the browser (MSAL.js), redirect URI http://127.0.0.1/app/ (any
//     port: the loopback rule of note 9 keeps the path), and the token endpoint answers CORS only
//     for such loopback origins (Entra: the "spa" platform of the app registration).

import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import Provider, { errors } from 'oidc-provider';

import { makeWorkloads, readForm as readFormBody } from './workloads.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..', '..');

// ---- options -----------------------------------------------------------------------------------

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const [k, inline] = a.slice(2).split('=', 2);
    out[k] = inline !== undefined ? inline : argv[++i];
    if (out[k] === undefined) throw new Error(`missing value for --${k}`);
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
const PORT = Number(args.port ?? process.env.OIDC_PORT ?? 8443);
const STATE = path.resolve(args['state-dir'] ?? process.env.OIDC_STATE_DIR ?? path.join(REPO, '.local', 'devstack'));
const CERT = args.cert ?? process.env.OIDC_TLS_CERT ?? path.join(STATE, 'tls', 'server.pem');
const KEY = args.key ?? process.env.OIDC_TLS_KEY ?? path.join(STATE, 'tls', 'server.key');
const USERS = args.users ?? process.env.OIDC_USERS ?? path.join(HERE, 'users.json');
const POLL_INTERVAL = Number(args['poll-interval'] ?? process.env.OIDC_POLL_INTERVAL ?? 1);
const DEBUG = !!process.env.OIDC_DEBUG;
const MI_PORT = Number(args['mi-port'] ?? process.env.OIDC_MI_PORT ?? 0); // managed identity endpoint (0: none)
const HOST = '127.0.0.1';

if (!Number.isInteger(PORT) || PORT <= 0 || PORT > 65535) throw new Error(`bad port ${PORT}`);

const log = (...parts) => console.log(new Date().toISOString(), 'oidc', ...parts);

// ---- config + persisted secrets ----------------------------------------------------------------

const config = JSON.parse(readFileSync(USERS, 'utf8'));
const API = config.api;
const CLI = config.cli;
const APP_ID_URI = API.app_id_uri; // api://ezssh
const API_PREFIX = `${APP_ID_URI}/`;
const API_SCOPES = [`${API_PREFIX}${API.scope}`, `${API_PREFIX}.default`];

// The web page's redirect URIs (note 11): a loopback host on any port, path /app/.
const SPA_REDIRECT_URIS = ['http://127.0.0.1/app/', 'http://localhost/app/'];
const spaOrigin = (origin) => {
  const u = URL.parse(origin ?? '');
  return !!u && u.protocol === 'http:' && ['127.0.0.1', 'localhost'].includes(u.hostname) && u.pathname === '/';
};

const OIDC_DIR = path.join(STATE, 'oidc');
mkdirSync(OIDC_DIR, { recursive: true, mode: 0o700 });

function writeAtomic(file, text, mode = 0o600) {
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, text, { mode });
  renameSync(tmp, file);
}

function loadOrCreate(file, make) {
  if (existsSync(file)) return JSON.parse(readFileSync(file, 'utf8'));
  const value = make();
  writeAtomic(file, JSON.stringify(value, null, 2));
  return value;
}

const b64url = (buf) => Buffer.from(buf).toString('base64url');

const jwks = loadOrCreate(path.join(OIDC_DIR, 'jwks.json'), () => {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const thumb = createHash('sha256').update(JSON.stringify({ e: jwk.e, kty: 'RSA', n: jwk.n })).digest();
  return { keys: [{ ...jwk, kid: b64url(thumb), alg: 'RS256', use: 'sig' }] };
});

const cookieKeys = loadOrCreate(path.join(OIDC_DIR, 'cookie-keys.json'), () => [b64url(randomBytes(32))]);

// ---- a small file-backed adapter (one store per tenant) ---------------------------------------

function makeAdapter(file) {
  const store = new Map(); // `${model}:${id}` -> { payload, exp (ms epoch) | null }
  const now = () => Date.now();
  if (existsSync(file)) {
    try {
      for (const [k, v] of Object.entries(JSON.parse(readFileSync(file, 'utf8')))) {
        if (!v.exp || v.exp > now()) store.set(k, v);
      }
    } catch (err) {
      log(`ignoring unreadable store ${file}: ${err.message}`);
    }
  }
  let timer = null;
  const flush = () => {
    timer = null;
    const obj = {};
    for (const [k, v] of store) if (!v.exp || v.exp > now()) obj[k] = v;
    writeAtomic(file, JSON.stringify(obj));
  };
  const persist = () => { if (!timer) timer = setTimeout(flush, 100); };
  const live = (k) => {
    const e = store.get(k);
    if (!e) return undefined;
    if (e.exp && e.exp <= now()) { store.delete(k); return undefined; }
    return e;
  };

  class FileAdapter {
    constructor(name) { this.name = name; }

    key(id) { return `${this.name}:${id}`; }

    async upsert(id, payload, expiresIn) {
      store.set(this.key(id), { payload, exp: expiresIn ? now() + expiresIn * 1000 : null });
      persist();
    }

    async find(id) { return live(this.key(id))?.payload; }

    scan(pred) {
      const prefix = `${this.name}:`;
      for (const [k] of store) {
        if (k.startsWith(prefix)) {
          const e = live(k);
          if (e && pred(e.payload)) return e.payload;
        }
      }
      return undefined;
    }

    async findByUserCode(userCode) { return this.scan((p) => p.userCode === userCode); }

    async findByUid(uid) { return this.scan((p) => p.uid === uid); }

    async consume(id) {
      const e = live(this.key(id));
      if (e) { e.payload.consumed = Math.floor(now() / 1000); persist(); }
    }

    async destroy(id) { store.delete(this.key(id)); persist(); }

    async revokeByGrantId(grantId) {
      for (const [k, v] of store) if (v.payload?.grantId === grantId) store.delete(k);
      persist();
    }
  }
  FileAdapter.flush = () => { if (timer) { clearTimeout(timer); flush(); } };
  return FileAdapter;
}

// ---- helpers -----------------------------------------------------------------------------------

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body><h1>${esc(title)}</h1>
${body}
</body></html>`;
}

const readForm = (req) => readFormBody(req, 16 * 1024);

function send(res, status, html) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(html);
}

// ---- one provider per tenant -------------------------------------------------------------------

const base = `https://${HOST}:${PORT}`;
const tenants = new Map(); // tid -> { name, provider, users, adapter }

function pairwiseSub(tid, oid, audience) {
  return b64url(createHash('sha256').update(`${tid}:${oid}:${audience}`).digest());
}

function buildTenant(tid, tenant) {
  const issuer = `${base}/${tid}`;
  const short = tenant.name.replace(/[^a-z0-9]/gi, '');
  const users = tenant.users.map((u) => ({ ...u, tid }));
  const byOid = new Map(users.map((u) => [u.oid, u]));
  const byLogin = new Map();
  for (const u of users) {
    byLogin.set(u.username.toLowerCase(), u);
    byLogin.set(u.preferred_username.toLowerCase(), u);
  }
  const Adapter = makeAdapter(path.join(OIDC_DIR, `store-${tid}.json`));

  const provider = new Provider(issuer, {
    adapter: Adapter,
    clients: [{
      client_id: CLI.client_id,
      client_name: CLI.name ?? 'ezssh CLI',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      // Device code, and authorization code + PKCE on a loopback redirect (see note 9).
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: ['http://localhost', 'http://127.0.0.1', 'http://[::1]', ...SPA_REDIRECT_URIS],
    }],
    jwks,
    cookies: {
      keys: cookieKeys,
      names: { session: `_s_${short}`, interaction: `_i_${short}`, resume: `_r_${short}` },
      long: { httpOnly: true, sameSite: 'lax', path: `/${tid}` },
      short: { httpOnly: true, sameSite: 'lax', path: `/${tid}` },
    },
    claims: {
      openid: ['sub', 'oid', 'tid', 'ver'],
      profile: ['name', 'preferred_username'],
      email: ['email'],
    },
    conformIdTokenClaims: false,
    scopes: ['openid', 'offline_access', 'profile', 'email'],
    clientBasedCORS: (ctx, origin, client) => client.clientId === CLI.client_id && spaOrigin(origin),
    async findAccount(ctx, sub) {
      const u = byOid.get(sub);
      if (!u) return undefined;
      return {
        accountId: u.oid,
        async claims() {
          return {
            sub: u.oid,
            oid: u.oid,
            tid,
            ver: '2.0',
            name: u.name,
            preferred_username: u.preferred_username,
            email: u.preferred_username,
          };
        },
      };
    },
    features: {
      devInteractions: { enabled: false },
      rpInitiatedLogout: { enabled: false },
      introspection: { enabled: false },
      revocation: { enabled: true, allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId },
      userinfo: { enabled: true },
      deviceFlow: {
        enabled: true,
        charset: 'base-20',
        mask: '****-****',
        async userCodeInputSource(ctx, form, out, err) {
          let msg = '<p id="message">Enter the code displayed on your device.</p>';
          if (err?.name === 'AlreadyUsedError') {
            msg = '<p id="error">This code has already been used. Start the sign-in again on your device.</p>';
          } else if (err?.name === 'ExpiredError') {
            msg = '<p id="error">This code has expired. Start the sign-in again on your device.</p>';
          } else if (err && (err.userCode || err.name === 'NoCodeError')) {
            msg = '<p id="error">The code you entered is incorrect. Try again.</p>';
          } else if (err && err.name === 'AbortedError') {
            msg = '<p id="error">The sign-in request was interrupted.</p>';
          } else if (err) {
            msg = `<p id="error">There was an error processing your request: ${esc(err.message || err.name)}</p>`;
          }
          ctx.body = page(`Sign in to ${tenant.name}`, `${msg}\n${form}\n<button type="submit" form="op.deviceInputForm">Continue</button>`);
        },
        async userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
          ctx.body = page('Confirm device', `<p>${esc(client.clientName || client.clientId)} wants to sign you in to ${esc(tenant.name)}. Code: <code>${esc(userCode)}</code></p>\n${form}\n<button type="submit" form="op.deviceConfirmForm">Continue</button>`);
        },
        async successSource(ctx) {
          ctx.body = page('Sign-in success', `<p id="success">You have signed in to ${esc(ctx.oidc.client.clientName || ctx.oidc.client.clientId)} (tenant ${esc(tenant.name)}). You can close this page.</p>`);
        },
      },
      resourceIndicators: {
        enabled: true,
        async defaultResource(ctx, client, oneOf) {
          if (oneOf) return Array.isArray(oneOf) ? oneOf[0] : oneOf;
          const scope = ctx.oidc.params?.scope ?? '';
          return scope.split(' ').some((s) => s.startsWith(API_PREFIX)) ? APP_ID_URI : undefined;
        },
        async useGrantedResource() { return true; },
        async getResourceServerInfo(ctx, resourceIndicator) {
          if (resourceIndicator !== APP_ID_URI) throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
          return {
            scope: API_SCOPES.join(' '),
            audience: API.client_id,
            accessTokenTTL: 3600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    formats: {
      customizers: {
        async jwt(ctx, token, jwt) {
          const p = jwt.payload;
          const u = byOid.get(token.accountId);
          const scp = [...new Set((p.scope ?? '').split(' ').filter(Boolean)
            .map((s) => (s.startsWith(API_PREFIX) ? s.slice(API_PREFIX.length) : s))
            .map((s) => (s === '.default' ? API.scope : s)))].join(' ');
          const out = {
            aud: p.aud,
            iss: p.iss,
            iat: p.iat,
            nbf: p.iat,
            exp: p.exp,
            azp: p.client_id,
            azpacr: '0',
            name: u?.name,
            oid: u?.oid,
            preferred_username: u?.preferred_username,
            scp,
            sub: u ? pairwiseSub(tid, u.oid, p.aud) : p.sub,
            tid,
            uti: p.jti,
            jti: p.jti,
            ver: '2.0',
          };
          if (u?.groups?.length) out.groups = [...u.groups];
          if (u?.roles?.length) out.roles = [...u.roles];
          // Entra's optional and guest claims (acct, idp, upn, ...) for the dev users that have them.
          if (u?.claims) Object.assign(out, u.claims);
          if (p.cnf) out.cnf = p.cnf;
          jwt.payload = out;
          jwt.header = { typ: 'JWT' };
        },
      },
    },
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    expiresWithSession: async () => false,
    interactions: {
      url: async (ctx, interaction) => `/${tid}/interaction/${interaction.uid}`,
    },
    pkce: { required: () => true }, // authorization code requests must use PKCE (S256); device flow unaffected
    ttl: {
      AccessToken: 3600,
      AuthorizationCode: 60,
      ClientCredentials: 600,
      DeviceCode: 900,
      Grant: 90 * 24 * 3600,
      IdToken: 3600,
      Interaction: 3600,
      RefreshToken: 90 * 24 * 3600,
      Session: 14 * 24 * 3600,
      BackchannelAuthenticationRequest: 600,
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Sign-in error', `<p id="error"><strong>${esc(out.error)}</strong>: ${esc(out.error_description ?? '')}</p>`);
    },
  });

  // Entra-like extras on two JSON responses (see notes 3 and 4 at the top).
  provider.use(async (ctx, next) => {
    await next();
    const route = ctx.oidc?.route;
    if (ctx.status !== 200 || !ctx.body || typeof ctx.body !== 'object') return;
    if (route === 'device_authorization' && ctx.body.device_code) {
      ctx.body.interval = POLL_INTERVAL;
      ctx.body.message = `To sign in, use a web browser to open the page ${ctx.body.verification_uri} and enter the code ${ctx.body.user_code} to authenticate.`;
    } else if (route === 'token' && ctx.body.access_token) {
      const account = ctx.oidc.entities.Account;
      if (account) ctx.body.client_info = b64url(JSON.stringify({ uid: account.accountId, utid: tid }));
    }
  });

  provider.on('server_error', (ctx, err) => log(`[${tenant.name}] server_error ${ctx?.method} ${ctx?.path}:`, err));
  provider.on('grant.error', (ctx, err) => {
    if (err.error !== 'authorization_pending') log(`[${tenant.name}] grant.error ${err.error}: ${err.error_description}`);
  });
  provider.on('grant.success', (ctx) => {
    const acc = ctx.oidc.entities.Account;
    log(`[${tenant.name}] token issued (${ctx.oidc.params.grant_type}) for ${acc ? byOid.get(acc.accountId)?.preferred_username : '-'}`);
  });

  // Our own login + consent interaction (devInteractions is off).
  async function interaction(req, res, rest) {
    const m = rest.match(/^\/interaction\/([A-Za-z0-9_-]+)(\/login|\/abort)?\/?$/);
    if (!m) return send(res, 404, page('Not found', '<p id="error">no such page</p>'));
    const [, uid, action] = m;
    let details;
    try {
      details = await provider.interactionDetails(req, res);
    } catch (err) {
      return send(res, 400, page('Sign-in error', `<p id="error">interaction not found or expired: ${esc(err.message)}</p>`));
    }
    if (details.uid !== uid) return send(res, 400, page('Sign-in error', '<p id="error">interaction mismatch</p>'));
    const { prompt, params, session, grantId } = details;

    const loginForm = (error) => page(`Sign in to ${tenant.name}`, `${error ? `<p id="error">${esc(error)}</p>` : ''}
<form id="login" method="post" action="/${tid}/interaction/${uid}/login">
<input type="text" name="username" placeholder="user@${esc(tenant.domain ?? tenant.name)}" autofocus>
<input type="password" name="password" placeholder="password">
<button type="submit">Sign in</button>
</form>
<form id="abort" method="post" action="/${tid}/interaction/${uid}/abort"><button type="submit">Cancel</button></form>`);

    if (action === '/abort' && req.method === 'POST') {
      return provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'End-User aborted interaction' }, { mergeWithLastSubmission: false });
    }

    if (action === '/login') {
      if (req.method !== 'POST') return send(res, 405, page('Sign-in error', '<p id="error">use POST</p>'));
      if (prompt.name !== 'login') return send(res, 400, page('Sign-in error', '<p id="error">login is not pending</p>'));
      const form = await readForm(req);
      const login = (form.get('username') ?? '').trim().toLowerCase();
      const u = byLogin.get(login);
      if (!u || u.password !== (form.get('password') ?? '')) {
        log(`[${tenant.name}] login refused for ${JSON.stringify(login)}`);
        return send(res, 401, loginForm('Your account or password is incorrect.'));
      }
      log(`[${tenant.name}] login ok for ${u.preferred_username}`);
      return provider.interactionFinished(req, res, {
        login: { accountId: u.oid, amr: ['pwd'], remember: true },
      }, { mergeWithLastSubmission: false });
    }

    if (req.method !== 'GET') return send(res, 405, page('Sign-in error', '<p id="error">use GET</p>'));

    if (prompt.name === 'login') return send(res, 200, loginForm());

    if (prompt.name === 'consent') {
      // Admin consent is assumed for the dev app registrations: grant what is missing, no page.
      const d = prompt.details;
      const grant = grantId
        ? await provider.Grant.find(grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
      if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
      if (d.missingResourceScopes) {
        for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
          grant.addResourceScope(indicator, scopes.join(' '));
        }
      }
      const savedId = await grant.save();
      return provider.interactionFinished(req, res, grantId ? { consent: {} } : { consent: { grantId: savedId } }, { mergeWithLastSubmission: true });
    }

    return send(res, 400, page('Sign-in error', `<p id="error">unsupported prompt ${esc(prompt.name)}</p>`));
  }

  const callback = provider.callback();
  return {
    name: tenant.name, issuer, provider, Adapter,
    async handle(req, res, rest) {
      if (rest.startsWith('/interaction/')) return interaction(req, res, rest);
      req.originalUrl = req.url;
      req.url = rest || '/';
      return callback(req, res);
    },
  };
}

for (const [tid, tenant] of Object.entries(config.tenants)) {
  tenants.set(tid.toLowerCase(), buildTenant(tid, tenant));
}
// App-only tokens for workloads (client credentials, federated credentials, managed identity).
const workloads = makeWorkloads({ base, config, jwks, stateDir: STATE, log });
const miServer = MI_PORT ? workloads.managedIdentityServer(MI_PORT) : null;

// ---- the listener ------------------------------------------------------------------------------

const server = https.createServer({ cert: readFileSync(CERT), key: readFileSync(KEY) }, (req, res) => {
  const t0 = Date.now();
  if (DEBUG) res.on('finish', () => log(req.method, req.originalUrl ?? req.url, res.statusCode, `${Date.now() - t0}ms`));
  const ciPath = (req.url ?? '/').match(/^\/ci(?=\/|\?|$)(.*)$/);
  if (ciPath) {
    Promise.resolve(workloads.handleCi(req, res, ciPath[1])).catch((err) => {
      log('[ci] unhandled error:', err);
      if (!res.headersSent) send(res, 500, page('Server error', '<p id="error">internal error</p>'));
    });
    return;
  }
  const m = (req.url ?? '/').match(/^\/([0-9a-fA-F-]{36})(?=\/|\?|$)(.*)$/);
  const t = m && tenants.get(m[1].toLowerCase());
  if (!t) {
    if (req.url === '/' || req.url === '/healthz') {
      res.setHeader('Content-Type', 'application/json');
      res.end(JSON.stringify({ status: 'ok', tenants: [...tenants].map(([tid, x]) => ({ tid, name: x.name, issuer: x.issuer })) }));
      return;
    }
    send(res, 404, page('Not found', '<p id="error">unknown tenant</p>'));
    return;
  }
  let rest = m[2];
  if (rest.startsWith('?')) rest = `/${rest}`;
  const tid = m[1].toLowerCase();
  Promise.resolve(workloads.handleTenant(req, res, tid, rest))
    .then((done) => (done ? undefined : t.handle(req, res, rest))).catch((err) => {
    log(`[${t.name}] unhandled error on ${req.method} ${req.url}:`, err);
    if (!res.headersSent) send(res, 500, page('Server error', '<p id="error">internal error</p>'));
    else res.end();
  });
});

server.keepAliveTimeout = 5000;
server.listen(PORT, HOST, () => {
  log(`listening on ${base} (state ${STATE}); issuers: ${[...tenants.values()].map((t) => `${t.name}=${t.issuer}`).join(' ')}`);
});

let stopping = false;
function shutdown(sig) {
  if (stopping) return;
  stopping = true;
  log(`${sig}: shutting down`);
  for (const t of tenants.values()) {
    try { t.Adapter.flush(); } catch (err) { log('flush failed:', err.message); }
  }
  miServer?.close();
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
