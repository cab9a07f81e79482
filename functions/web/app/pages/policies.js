// Policies: members read what they need to ask for access; admins edit the document (If-Match on
// save: a stale edit is shown as a conflict and kept, never written over someone else's), rotate
// the CA, and see the CA keys, the host setup command and the enrolments.
import { html, useState, when, duration, ErrorBox, usePaged, usePoll } from '../ui.js';
import { call, get } from '../api.js';
import { Enrolments } from './hosts.js';

// The fields an admin writes (the service sets the rest); the CLI's `ezssh policy edit` takes the same.
const EDITABLE = ['id', 'name', 'rules', 'hosts', 'principals', 'logins', 'approvers', 'approvals_required', 'admins',
  'default_ttl', 'max_ttl', 'request_ttl', 'extensions', 'force_command', 'source_address', 'webhook_url',
  'webhook_format', 'host_cert_ttl'];

export function Policies() {
  const { items, next, more, error } = usePaged('/api/policies', 'policies');
  if (error) return html`<h1>Policies</h1><${ErrorBox} error=${error} />`;
  if (!items) return html`<p class="loading">Loading…</p>`;
  return html`
    <h1>Policies</h1>
    ${!items.length ? html`<p class="muted">You can see no policy.</p>` : null}
    <div class="table"><table>
      <thead><tr><th>Policy</th><th>Hosts</th><th>Longest</th><th>You</th></tr></thead>
      <tbody>${items.map((p) => html`
        <tr data-policy=${p.id}><td><a href=${`/app/policies/${p.id}`}>${p.name || p.id}</a></td>
          <td>${(p.hosts || []).join(', ')}</td><td>${duration(p.max_ttl)}</td>
          <td>${[p.you.admin && 'admin', p.you.approver && 'approver', p.you.member && 'member'].filter(Boolean).join(', ') || '-'}</td></tr>`)}
      </tbody></table></div>
    ${next ? html`<button type="button" onClick=${more}>More</button>` : null}`;
}

function documentOf(p) {
  const doc = {};
  for (const k of EDITABLE) if (p[k] !== undefined && p[k] !== null) doc[k] = p[k];
  return JSON.stringify(doc, null, 2);
}

// "'max_ttl' must be ..." -> "max_ttl": the field the service's message is about
function fieldOf(message) {
  const m = /^'([a-z_]+)'/.exec(message || '') || /\b([a-z_]+)(?:\[\d+\])?[.:]/.exec(message || '');
  return m && EDITABLE.includes(m[1]) ? m[1] : null;
}

function Editor({ policy, etag, onSaved }) {
  const [text, setText] = useState(() => documentOf(policy));
  const [base, setBase] = useState(etag);
  const [problem, setProblem] = useState(null); // {kind: 'conflict'|'invalid'|'error', message, field}
  const [saved, setSaved] = useState(false);
  const [busy, setBusy] = useState(false);
  const save = async () => {
    setSaved(false);
    let doc;
    try { doc = JSON.parse(text); } catch (e) {
      setProblem({ kind: 'invalid', message: `The document is not valid JSON: ${e.message}` });
      return;
    }
    setBusy(true);
    try {
      const r = await call(`/api/policies/${policy.id}`, { method: 'PATCH', body: doc, ifMatch: base });
      setBase(r.etag);
      setText(documentOf(r.data));
      setProblem(null);
      setSaved(true);
      onSaved(r.data, r.etag);
    } catch (e) {
      if (e.status === 412 || e.status === 409) {
        setProblem({ kind: 'conflict', message: 'Someone changed this policy after you opened it. Your edit was not saved and is kept below; copy it, reload the policy, and apply it again.' });
      } else {
        setProblem({ kind: e.status === 400 ? 'invalid' : 'error', message: e.message, field: fieldOf(e.message) });
      }
    }
    setBusy(false);
  };
  return html`
    <form class="editor" onSubmit=${(ev) => { ev.preventDefault(); save(); }}>
      <label for="policy-doc">Policy document (JSON)</label>
      <textarea id="policy-doc" name="document" rows="18" spellcheck="false" aria-invalid=${problem ? 'true' : 'false'}
        aria-describedby="policy-problem" value=${text} onInput=${(ev) => setText(ev.target.value)}></textarea>
      <p id="policy-problem" class=${problem ? `error ${problem.kind}` : 'hidden'} role="alert">
        ${problem && problem.field ? html`<strong>${problem.field}</strong>: ` : null}${problem ? problem.message : ''}</p>
      ${saved ? html`<p class="saved" role="status">Saved.</p>` : null}
      <button type="submit" disabled=${busy}>Save</button>
    </form>`;
}

function CaKeys({ id }) {
  const [data, error] = usePoll(() => get(`/api/policies/${id}/ca?format=json`), [id]);
  if (error) return html`<${ErrorBox} error=${error} />`;
  if (!data) return null;
  return html`${['user', 'host'].map((kind) => html`
    <h3>${kind === 'user' ? 'User CA (servers trust it)' : 'Host CA (clients trust it)'}</h3>
    <ul class="keys">${(data[kind] || []).map((k) => html`
      <li><span class="state">${k.state}</span> <span class="mono">${k.fingerprint}</span>
        ${k.retire_after ? html` <small>trusted until ${when(k.retire_after)}</small>` : null}</li>`)}
    </ul>`)}`;
}

export function PolicyPage({ id }) {
  const [version, setVersion] = useState(0);
  const [note, setNote] = useState(null);
  const [data, error, reload] = usePoll(() => call(`/api/policies/${id}`), [id, version]);
  if (error) return html`<h1>Policy ${id}</h1><${ErrorBox} error=${error} />`;
  if (!data) return html`<p class="loading">Loading…</p>`;
  const p = data.data;
  const rotate = async (kind) => {
    try {
      const fresh = await call(`/api/policies/${id}`);
      await call(`/api/policies/${id}/rotate-ca?kind=${kind}`, { method: 'POST', ifMatch: fresh.etag });
      setNote(`A new ${kind} CA key is current; the previous one stays trusted until its certificates expire.`);
      setVersion(version + 1);
    } catch (e) { setNote(e.message); }
  };
  return html`
    <h1>${p.name || p.id}</h1>
    <dl class="facts">
      <dt>Hosts</dt><dd>${(p.hosts || []).join(', ')}</dd>
      <dt>Your logins</dt><dd>${(p.you.logins || []).join(', ') || '-'}</dd>
      <dt>Access</dt><dd>${p.you.access}</dd>
      <dt>Approvals</dt><dd>${p.approvals_required}</dd>
      <dt>TTL</dt><dd>${duration(p.default_ttl)} (longest ${duration(p.max_ttl)})</dd>
    </dl>
    ${p.you.admin ? html`
      <section class="admin">
        <h2>Edit</h2>
        <${Editor} key=${`${p.id}-${version}`} policy=${p} etag=${data.etag} onSaved=${() => reload()} />
        <h2>CA keys</h2>
        <${CaKeys} key=${version} id=${id} />
        <div class="buttons">
          <button type="button" onClick=${() => rotate('user')}>Rotate user CA</button>
          <button type="button" onClick=${() => rotate('host')}>Rotate host CA</button>
        </div>
        ${note ? html`<p class="note" role="status">${note}</p>` : null}
        <h2>Set up a host</h2>
        <p>On the host, as root (the script carries the policy's host token):</p>
        <pre class="mono">${`ezssh policy host-setup ${p.id} > setup.sh && sudo sh setup.sh`}</pre>
        <h2>Enrolments</h2>
        <${Enrolments} id=${id} />
      </section>` : html`
      <h2>CA public keys</h2>
      <ul class="keys">${(p.ca || []).map((k) => html`<li><span class="state">${k.state}</span> <span class="mono">${k.fingerprint}</span></li>`)}</ul>`}`;
}
