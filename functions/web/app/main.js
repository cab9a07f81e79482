// The page's shell: sign-in, navigation (paths under /app/, so a link from a chat card opens the
// right page), and the pages themselves.
import { html, navigate, render, useEffect, useState } from './ui.js';
import * as auth from './auth.js';
import { Approvals } from './pages/approvals.js';
import { RequestPage } from './pages/request.js';
import { MyAccess } from './pages/access.js';
import { Policies, PolicyPage } from './pages/policies.js';
import { Audit } from './pages/audit.js';
import { Hosts } from './pages/hosts.js';

const NAV = [
  ['/app/', 'Approvals'],
  ['/app/access', 'My access'],
  ['/app/policies', 'Policies'],
  ['/app/audit', 'Audit'],
  ['/app/hosts', 'Hosts'],
];

function route(path) {
  let m;
  if ((m = path.match(/^\/app\/requests\/([0-9a-f]{16})\/?$/))) return html`<${RequestPage} id=${m[1]} />`;
  if ((m = path.match(/^\/app\/policies\/([A-Za-z0-9._-]{1,63})\/?$/))) return html`<${PolicyPage} id=${m[1]} />`;
  switch (path.replace(/\/$/, '')) {
    case '/app': return html`<${Approvals} />`;
    case '/app/access': return html`<${MyAccess} />`;
    case '/app/policies': return html`<${Policies} />`;
    case '/app/audit': return html`<${Audit} />`;
    case '/app/hosts': return html`<${Hosts} />`;
    default: return html`<p class="error">There is no page at this address. <a href="/app/">Approvals</a></p>`;
  }
}

function Shell() {
  const [path, setPath] = useState(location.pathname);
  useEffect(() => {
    const onPop = () => setPath(location.pathname);
    window.addEventListener('popstate', onPop);
    return () => window.removeEventListener('popstate', onPop);
  }, []);
  const who = auth.signedIn();
  const here = path.replace(/\/$/, '') || '/app';
  return html`
    <header>
      <a class="brand" href="/app/">ezssh</a>
      <nav aria-label="Pages">
        ${NAV.map(([href, label]) => html`
          <a href=${href} aria-current=${here === href.replace(/\/$/, '') ? 'page' : undefined}>${label}</a>`)}
      </nav>
      <span class="me">
        <span id="me-name">${who.name || who.username}</span>
        <button type="button" class="link" onClick=${() => auth.signOut()}>Sign out</button>
      </span>
    </header>
    <main>${route(path)}</main>`;
}

function SignIn({ error }) {
  const cfg = auth.clientConfig();
  const [busy, setBusy] = useState(false);
  const go = async (tenant) => {
    setBusy(true);
    try { await auth.signIn(tenant); } catch (e) { setBusy(false); alertError(e); }
  };
  return html`
    <main class="signin">
      <h1>ezssh</h1>
      <p>Approve access requests, read policies and the audit log.</p>
      ${error ? html`<p class="error" role="alert">${error}</p>` : null}
      ${cfg.tenants.length === 1
        ? html`<button type="button" id="sign-in" disabled=${busy} onClick=${() => go(cfg.tenants[0])}>Sign in</button>`
        : html`<p>Sign in to your organisation:</p>
          <ul class="tenants">${cfg.tenants.map((t) => html`
            <li><button type="button" class="tenant" data-tenant=${t} disabled=${busy} onClick=${() => go(t)}>Sign in to ${t}</button></li>`)}
          </ul>`}
    </main>`;
}

function alertError(e) {
  render(html`<${SignIn} error=${e.message || String(e)} />`, document.getElementById('root'));
}

// Links inside the app change the page without a reload.
document.addEventListener('click', (ev) => {
  const a = ev.target.closest && ev.target.closest('a[href^="/app"]');
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  ev.preventDefault();
  if (a.getAttribute('href') !== location.pathname) navigate(a.getAttribute('href'));
});

async function main() {
  const root = document.getElementById('root');
  root.textContent = '';
  try {
    const account = await auth.start();
    render(account ? html`<${Shell} />` : html`<${SignIn} />`, root);
  } catch (e) {
    if (auth.clientConfig()) alertError(e);
    else root.textContent = e.message || String(e);
  }
}

main();
