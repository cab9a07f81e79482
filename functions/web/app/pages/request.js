// One request (the link a chat card and the CLI give): its state, every decision with its comment,
// and, once issued, the certificate's key id and serial. Read again while it can still change.
import { html, useState, when, duration, ErrorBox, Person, State, usePoll } from '../ui.js';
import { call, get } from '../api.js';
import { signedIn } from '../auth.js';
import { Approvals, Decide, outcomeText } from './decide.js';

export function RequestPage({ id }) {
  const [note, setNote] = useState(null);
  const [data, error, reload] = usePoll(() => get(`/api/requests/${id}`), [id], 5000);
  if (error) return html`<h1>Request ${id}</h1><${ErrorBox} error=${error} />`;
  if (!data) return html`<p class="loading">Loading…</p>`;
  const r = data;
  const me = signedIn();
  const mine = me && r.requester && me.username && r.requester.toLowerCase() === me.username.toLowerCase();
  const cancel = async () => {
    try { await call(`/api/requests/${id}/cancel`, { method: 'POST', body: {} }); reload(); } catch (e) { setNote(e.message); }
  };
  return html`
    <h1>Request ${r.id} <${State} value=${r.status} /></h1>
    <dl class="facts">
      <dt>Requester</dt><dd><${Person} name=${r.requester_name} upn=${r.requester} /></dd>
      <dt>Host</dt><dd class="host">${r.host}</dd>
      <dt>Login</dt><dd>${r.principal}</dd>
      <dt>For</dt><dd>${duration(r.ttl_seconds)}</dd>
      <dt>Reason</dt><dd class="reason">${r.reason || '-'}</dd>
      <dt>Policy</dt><dd><a href=${`/app/policies/${r.policy}`}>${r.policy}</a></dd>
      <dt>Asked</dt><dd>${when(r.created_at)}</dd>
      <dt>Decide by</dt><dd>${when(r.expires_at)}</dd>
      <dt>Approvals</dt><dd>${(r.approvals || []).length} of ${r.approvals_required}</dd>
      ${r.key_id ? html`<dt>Key id</dt><dd class="mono">${r.key_id}</dd>` : null}
      ${r.serial && r.status === 'issued' ? html`<dt>Serial</dt><dd class="mono">${r.serial}</dd>` : null}
      ${r.valid_before ? html`<dt>Certificate expires</dt><dd id="cert-expiry">${when(r.valid_before)}</dd>` : null}
      ${r.revoked_at ? html`<dt>Revoked</dt><dd class="error">${when(r.revoked_at)}</dd>` : null}
    </dl>
    <h2>Decisions</h2>
    <${Approvals} list=${r.approvals} />
    ${r.status !== 'pending' ? html`
      <p class="outcome" role="status" id="outcome">${outcomeText(r)}${r.comment ? html` <q class="comment">${r.comment}</q>` : null}</p>` : null}
    ${note ? html`<p class="note" role="status">${note}</p>` : null}
    ${r.status === 'pending' && !mine ? html`<${Decide} req=${r} onDone=${(rec, n) => { setNote(n); reload(); }} />` : null}
    ${r.status === 'pending' && mine ? html`<button type="button" onClick=${cancel}>Cancel my request</button>` : null}`;
}
