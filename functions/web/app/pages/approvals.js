// What waits for my approval, with live state: the list is read again every few seconds, and a
// request that left it (decided elsewhere, cancelled, expired) stays on screen saying what happened.
import { html, useEffect, useRef, useState, ago, duration, ErrorBox, Person, State } from '../ui.js';
import { get, page } from '../api.js';
import { Approvals as ApprovalList, Decide, outcomeText } from './decide.js';

const LIST = '/api/requests?state=pending&role=approver';
const EVERY_MS = 5000;

function Card({ req, note, onDone }) {
  const more = Math.max(0, (req.approvals_required || 1) - (req.approvals || []).length);
  return html`
    <article class="card request" data-request=${req.id}>
      <header>
        <h2><${Person} name=${req.requester_name} upn=${req.requester} /></h2>
        <${State} value=${req.status} />
      </header>
      <dl class="facts">
        <dt>Host</dt><dd class="host">${req.host}</dd>
        <dt>Login</dt><dd>${req.principal}</dd>
        <dt>For</dt><dd>${duration(req.ttl_seconds)}</dd>
        <dt>Reason</dt><dd class="reason">${req.reason || '-'}</dd>
        <dt>Asked</dt><dd>${ago(req.created_at)}</dd>
        <dt>Approvals</dt><dd>${(req.approvals || []).length} of ${req.approvals_required}${req.status === 'pending' ? `, ${more} more needed` : ''}</dd>
      </dl>
      <${ApprovalList} list=${req.approvals} />
      ${note ? html`<p class="note" role="status">${note}</p>` : null}
      ${req.status === 'pending'
        ? html`<${Decide} req=${req} onDone=${onDone} />`
        : html`<p class="outcome" role="status">${outcomeText(req)}${req.comment ? html` <q class="comment">${req.comment}</q>` : null}</p>`}
      <p><a href=${`/app/requests/${req.id}`}>Request ${req.id}</a> · policy ${req.policy}</p>
    </article>`;
}

export function Approvals() {
  const [items, setItems] = useState([]); // [{req, note}]
  const [next, setNext] = useState(null);
  const [error, setError] = useState(null);
  const [loaded, setLoaded] = useState(false);
  const shown = useRef(new Map());

  const refresh = async () => {
    try {
      const first = await page(LIST, 'requests');
      const seen = new Set(first.items.map((r) => r.id));
      const merged = new Map(shown.current);
      for (const r of first.items) merged.set(r.id, { ...(merged.get(r.id) || {}), req: r });
      // requests shown before that are no longer pending: read their outcome once
      for (const [id, item] of merged) {
        if (!seen.has(id) && item.req.status === 'pending') {
          try { merged.set(id, { ...item, req: await get(`/api/requests/${id}`) }); } catch (_) { merged.delete(id); }
        }
      }
      shown.current = merged;
      setItems([...merged.values()]);
      if (!loaded) setNext(first.next);
      setLoaded(true);
      setError(null);
    } catch (e) {
      setError(e);
    }
  };

  useEffect(() => {
    refresh();
    const t = setInterval(() => { if (document.visibilityState === 'visible') refresh(); }, EVERY_MS);
    return () => clearInterval(t);
  }, []);

  const more = async () => {
    try {
      const p = await page(LIST, 'requests', next);
      for (const r of p.items) shown.current.set(r.id, { req: r });
      setItems([...shown.current.values()]);
      setNext(p.next);
    } catch (e) { setError(e); }
  };

  const done = (id) => (rec, note) => {
    const item = shown.current.get(id);
    shown.current.set(id, { req: rec || item.req, note });
    setItems([...shown.current.values()]);
  };

  return html`
    <h1>Waiting for my approval</h1>
    <${ErrorBox} error=${error} />
    ${loaded && !items.length ? html`<p class="muted" id="none-pending">Nothing waits for your approval.</p>` : null}
    <div class="cards">${items.map(({ req, note }) => html`<${Card} key=${req.id} req=${req} note=${note} onDone=${done(req.id)} />`)}</div>
    ${next ? html`<button type="button" onClick=${more}>More</button>` : null}`;
}
