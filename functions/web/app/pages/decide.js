// Approve or deny one request, with a comment. A lost race (someone decided first) is shown with
// who decided and what they wrote, read back from the service.
import { html, useState, Person } from '../ui.js';
import { call, get } from '../api.js';

export function outcomeText(r) {
  if (!r) return '';
  const by = r.decided_by_name || r.decided_by;
  switch (r.status) {
    case 'approved': return `Approved${by ? ` by ${by}` : ''}.`;
    case 'issued': return `Approved${by ? ` by ${by}` : ''}; the certificate was issued.`;
    case 'denied': return `Denied${by ? ` by ${by}` : ''}.`;
    case 'cancelled': return `Cancelled${by ? ` by ${by}` : ''}.`;
    case 'expired': return 'Expired before anyone decided.';
    default: return `Now ${r.status}.`;
  }
}

export function Decide({ req, onDone }) {
  const [comment, setComment] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const act = async (action) => {
    setBusy(true);
    setError(null);
    try {
      const { data } = await call(`/api/requests/${req.id}/${action}`, { method: 'POST', body: comment ? { comment } : {} });
      onDone(data, null);
    } catch (e) {
      if (e.status === 409) {
        // decided elsewhere: say by whom
        let now = null;
        try { now = await get(`/api/requests/${req.id}`); } catch (_) { /* the 409's own message stands */ }
        onDone(now, now && now.status !== 'pending' ? `Someone else decided first. ${outcomeText(now)}` : e.message);
      } else {
        setError(e);
      }
      setBusy(false);
    }
  };
  const id = `comment-${req.id}`;
  return html`
    <form class="decide" onSubmit=${(ev) => ev.preventDefault()}>
      <label for=${id}>Comment (the requester sees it)</label>
      <textarea id=${id} name="comment" rows="2" maxlength="1000" value=${comment}
        onInput=${(ev) => setComment(ev.target.value)}></textarea>
      <div class="buttons">
        <button type="button" class="approve" disabled=${busy} onClick=${() => act('approve')}>Approve</button>
        <button type="button" class="deny" disabled=${busy} onClick=${() => act('deny')}>Deny</button>
      </div>
      ${error ? html`<p class="error" role="alert">${error.message}</p>` : null}
    </form>`;
}

export function Approvals({ list }) {
  if (!list || !list.length) return html`<p class="muted">No approvals yet.</p>`;
  return html`<ul class="approvals">${list.map((a) => html`
    <li><${Person} name=${a.name} upn=${a.upn} />${a.comment ? html`: <q class="comment">${a.comment}</q>` : null}</li>`)}
  </ul>`;
}
