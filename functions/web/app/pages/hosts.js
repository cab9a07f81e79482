// Hosts: the enrolments of the policies I administer, and revoking a certificate with a reason.
import { html, useState, when, ErrorBox, usePoll } from '../ui.js';
import { call, page } from '../api.js';

function Revoke({ policies }) {
  const [policy, setPolicy] = useState(policies[0] ? policies[0].id : '');
  const [serial, setSerial] = useState('');
  const [reason, setReason] = useState('');
  const [done, setDone] = useState(null);
  const [error, setError] = useState(null);
  const submit = async (ev) => {
    ev.preventDefault();
    setError(null);
    setDone(null);
    try {
      const { data } = await call(`/api/certificates/${encodeURIComponent(policy)}/${encodeURIComponent(serial)}/revoke`,
        { method: 'POST', body: reason ? { reason } : {} });
      setDone(data);
    } catch (e) { setError(e); }
  };
  return html`
    <form class="search" onSubmit=${submit}>
      <label>Policy<select value=${policy} onChange=${(ev) => setPolicy(ev.target.value)}>
        ${policies.map((p) => html`<option value=${p.id}>${p.name || p.id}</option>`)}</select></label>
      <label>Serial<input name="serial" inputmode="numeric" required value=${serial} onInput=${(ev) => setSerial(ev.target.value.trim())} /></label>
      <label>Reason<input name="reason" maxlength="1000" value=${reason} onInput=${(ev) => setReason(ev.target.value)} /></label>
      <button type="submit" class="deny">Revoke</button>
    </form>
    <${ErrorBox} error=${error} />
    ${done ? html`<p class="ok" role="status">Revoked ${done.key_id || done.serial} (it would have expired ${when(done.valid_before)}).</p>` : null}`;
}

// One policy's enrolments (also shown on the policy's own page).
export function Enrolments({ id, title }) {
  const [data, error] = usePoll(() => page(`/api/policies/${id}/enrolments`, 'enrolments'), [id]);
  if (error) return html`<${ErrorBox} error=${error} />`;
  if (!data) return null;
  return html`
    ${title ? html`<h3>${title}</h3>` : null}
    ${!data.items.length ? html`<p class="muted">No host has enrolled.</p>` : html`
    <div class="table"><table>
      <thead><tr><th>Host</th><th>State</th><th>Updated</th></tr></thead>
      <tbody>${data.items.map((e) => html`<tr><td>${e.vm_name || e.host || e.vm_id || e.id}</td>
        <td>${e.state || e.status}</td><td>${when(e.updated_at || e.at)}</td></tr>`)}</tbody></table></div>`}`;
}

export function Hosts() {
  const [data, error] = usePoll(() => page('/api/policies', 'policies'), []);
  if (error) return html`<h1>Hosts</h1><${ErrorBox} error=${error} />`;
  if (!data) return html`<p class="loading">Loading…</p>`;
  const mine = data.items.filter((p) => p.you && p.you.admin);
  if (!mine.length) return html`<h1>Hosts</h1><p class="muted" id="not-admin">Only a policy's admins see its hosts.</p>`;
  return html`
    <h1>Hosts</h1>
    <h2>Revoke a certificate</h2>
    <${Revoke} policies=${mine} />
    <h2>Enrolments</h2>
    ${mine.map((p) => html`<${Enrolments} key=${p.id} id=${p.id} title=${p.name || p.id} />`)}`;
}
