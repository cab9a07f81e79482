// My access: the policies that admit me and the logins I may ask for (what `ezssh ls` shows), and my requests.
import { html, ago, duration, ErrorBox, State, usePaged, usePoll } from '../ui.js';
import { page } from '../api.js';

function MyRequests() {
  const { items, next, more, error } = usePaged('/api/requests?role=requester', 'requests', 10000);
  if (error) return html`<${ErrorBox} error=${error} />`;
  if (!items) return html`<p class="loading">Loading…</p>`;
  if (!items.length) return html`<p class="muted">You have made no requests lately.</p>`;
  return html`
    <div class="table"><table>
      <thead><tr><th>Request</th><th>State</th><th>Host</th><th>Login</th><th>Asked</th></tr></thead>
      <tbody>${items.map((r) => html`
        <tr><td><a href=${`/app/requests/${r.id}`}>${r.id}</a></td><td><${State} value=${r.status} /></td>
          <td>${r.host}</td><td>${r.principal}</td><td>${ago(r.created_at)}</td></tr>`)}
      </tbody></table></div>
    ${next ? html`<button type="button" onClick=${more}>More</button>` : null}`;
}

export function MyAccess() {
  const [data, error] = usePoll(() => page('/api/policies', 'policies'), []);
  const mine = data ? data.items.filter((p) => p.you && p.you.member) : [];
  return html`
    <h1>My access</h1>
    <${ErrorBox} error=${error} />
    ${data && !mine.length ? html`<p class="muted">No policy admits you yet.</p>` : null}
    <div class="cards">${mine.map((p) => html`
      <article class="card" data-policy=${p.id}>
        <header><h2><a href=${`/app/policies/${p.id}`}>${p.name || p.id}</a></h2>
          <span class="state">${p.you.access === 'auto' ? 'no approval needed' : 'needs approval'}</span></header>
        <dl class="facts">
          <dt>Logins</dt><dd>${(p.you.logins || []).join(', ') || '-'}</dd>
          <dt>Hosts</dt><dd>${(p.hosts || []).join(', ')}</dd>
          <dt>Longest</dt><dd>${duration(p.max_ttl)}</dd>
        </dl>
        <p class="mono">${`ezssh ssh ${(p.you.logins || ['<login>'])[0] || '<login>'}@<host>`}</p>
      </article>`)}
    </div>
    <h2>My requests</h2>
    <${MyRequests} />`;
}
