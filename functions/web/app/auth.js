// Sign-in with MSAL.js: authorization code + PKCE, by redirect (works on phones). Entra ID in
// production; the local OIDC stand-in with MSAL's OIDC protocol mode. Tokens live in MSAL's
// sessionStorage cache (this tab only); nothing is put in cookies.
const TENANT_KEY = 'ezssh.tenant';
let app = null;
let config = null;
let account = null;

export function signedIn() {
  return account;
}

export function clientConfig() {
  return config;
}

export function chosenTenant() {
  const t = sessionStorage.getItem(TENANT_KEY);
  if (t && config.authorities[t]) return t;
  return config.tenants.length === 1 ? config.tenants[0] : null;
}

function build(tenant) {
  const authority = config.authorities[tenant];
  const entra = config.authority_type === 'entra';
  return new window.msal.PublicClientApplication({
    auth: {
      clientId: config.client_id,
      authority,
      knownAuthorities: entra ? [] : [new URL(authority).host],
      redirectUri: `${location.origin}/app/`,
    },
    cache: { cacheLocation: 'sessionStorage' },
    system: { protocolMode: entra ? 'AAD' : 'OIDC' },
  });
}

// Load the configuration, finish a sign-in that redirected back here, and find the account.
export async function start() {
  const resp = await fetch('/api/client-config', { credentials: 'omit', cache: 'no-store' });
  if (!resp.ok) throw new Error(`The service's configuration could not be read (HTTP ${resp.status}).`);
  config = await resp.json();
  const tenant = chosenTenant();
  if (!tenant) return null;
  app = build(tenant);
  await app.initialize();
  const result = await app.handleRedirectPromise();
  account = (result && result.account) || app.getAllAccounts()[0] || null;
  if (account) app.setActiveAccount(account);
  return account;
}

export async function signIn(tenant) {
  sessionStorage.setItem(TENANT_KEY, tenant);
  if (!app) {
    app = build(tenant);
    await app.initialize();
  }
  await app.loginRedirect({ scopes: config.scopes });
}

export async function signOut() {
  if (app) await app.clearCache();
  sessionStorage.clear();
  location.assign('/app/');
}

export async function accessToken() {
  if (!app || !account) throw new Error('Sign in first.');
  try {
    return (await app.acquireTokenSilent({ scopes: config.scopes, account })).accessToken;
  } catch (e) {
    if (e instanceof window.msal.InteractionRequiredAuthError) {
      await app.acquireTokenRedirect({ scopes: config.scopes, account });
    }
    throw e;
  }
}
