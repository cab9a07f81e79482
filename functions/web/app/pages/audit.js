// The audit log: search by serial, key id, request id, policy and time; a request's chain and
// whether it verifies; and per policy a chart of issued / denied / expired per day.
import { html, useEffect, useRef, useState, when, ErrorBox } from '../ui.js';
import { all, page } from '../api.js';

const DAY = 86400;
const MAX_ENTRIES = 5000; // the charts read at most this many entries (5 pages)
const DENIALS = new Set(['denied', 'principal_not_allowed', 'no_policy_for_host', 'policy_needs_update']);
const SERIES = [['issued', '#1a7f37'], ['denied', '#cf222e'], ['expired', '#9a6700']];

function kindOf(e) {
  if (e.action === 'certificate.issued') return 'issued';
  if (e.action === 'request.denied' || (e.action === 'request.refused' && DENIALS.has(e.error_code))) return 'denied';
  if (e.action === 'request.expired') return 'expired';
  return null;
}

// {policy: {days: [unix day starts], issued: [...], denied: [...], expired: [...]}}
export function perDay(entries, since, days) {
  const start = Math.floor(since / DAY) * DAY;
  const out = {};
  for (const e of entries) {
    const kind = kindOf(e);
    if (!kind || !e.policy_id) continue;
    const i = Math.floor((e.at - start) / DAY);
    if (i < 0 || i >= days) continue;
    if (!out[e.policy_id]) {
      out[e.policy_id] = { days: Array.from({ length: days }, (_, d) => start + d * DAY) };
      for (const [k] of SERIES) out[e.policy_id][k] = new Array(days).fill(0);
    }
    out[e.policy_id][kind][i] += 1;
  }
  return out;
}

function Chart({ policy, data }) {
  const box = useRef(null);
  useEffect(() => {
    const width = Math.min(560, box.current.clientWidth || 320);
    const bars = window.uPlot.paths.bars({ size: [0.25, 18], gap: 1 });
    const plot = new window.uPlot({
      width, height: 160,
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(1, hi)] } },
      axes: [{}, { size: 36 }],
      series: [{}, ...SERIES.map(([label, color]) => ({ label, stroke: color, fill: color, paths: bars, points: { show: false } }))],
    }, [data.days, ...SERIES.map(([k]) => data[k])], box.current);
    return () => plot.destroy();
  }, [data]);
  const totals = SERIES.map(([k]) => `${k} ${data[k].reduce((a, b) => a + b, 0)}`).join(', ');
  return html`<figure class="chart" data-policy=${policy}>
    <figcaption>${policy}: ${totals}</figcaption><div ref=${box}></div></figure>`;
}

function Charts() {
  const [state, setState] = useState({ error: null, data: null });
  useEffect(() => {
    const days = 14;
    const since = Date.now() / 1000 - (days - 1) * DAY;
    all(`/api/audit?since=${Math.floor(Math.floor(since / DAY) * DAY)}&limit=1000`, 'entries', MAX_ENTRIES)
      .then((entries) => setState({ error: null, data: perDay(entries, since, days), partial: entries.length >= MAX_ENTRIES }))
      .catch((error) => setState({ error, data: null }));
  }, []);
  if (state.error) return html`<${ErrorBox} error=${state.error} />`;
  if (!state.data) return html`<p class="loading">Loading…</p>`;
  const policies = Object.keys(state.data).sort();
  if (!policies.length) return html`<p class="muted">Nothing was issued, denied or expired in the last 14 days.</p>`;
  return html`
    ${state.partial ? html`<p class="muted">Counted from the oldest ${MAX_ENTRIES} entries of the last 14 days.</p>` : null}
    <div class="charts">${policies.map((p) => html`<${Chart} key=${p} policy=${p} data=${state.data[p]} />`)}</div>`;
}

function toUnix(local) {
  return local ? String(Math.floor(new Date(local).getTime() / 1000)) : '';
}

export function Audit() {
  const [form, setForm] = useState({ request_id: '', serial: '', key_id: '', user: '', policy: '', since: '', until: '' });
  const [result, setResult] = useState(null); // {query, entries, next, chain_intact}
  const [error, setError] = useState(null);
  const set = (k) => (ev) => setForm({ ...form, [k]: ev.target.value.trim() });
  const run = async (values) => {
    setError(null);
    setResult(null);
    const q = new URLSearchParams();
    for (const k of ['request_id', 'serial', 'key_id', 'user', 'policy']) if (values[k]) q.set(k, values[k]);
    if (values.since) q.set('since', toUnix(values.since));
    if (values.until) q.set('until', toUnix(values.until));
    q.set('limit', '100');
    try {
      const p = await page(`/api/audit?${q}`, 'entries');
      setResult({ query: `/api/audit?${q}`, entries: p.items, next: p.next, chain_intact: p.data.chain_intact });
    } catch (e) { setResult(null); setError(e); }
  };
  const search = (ev) => { ev.preventDefault(); run(form); };
  const byUser = (oid) => { const f = { ...form, user: oid }; setForm(f); run(f); };
  const more = async () => {
    try {
      const p = await page(result.query, 'entries', result.next);
      setResult({ ...result, entries: result.entries.concat(p.items), next: p.next });
    } catch (e) { setError(e); }
  };
  const field = (k, label, type = 'text') => html`
    <label>${label}<input name=${k} type=${type} value=${form[k]} onInput=${set(k)} /></label>`;
  return html`
    <h1>Audit</h1>
    <form class="search" onSubmit=${search}>
      ${field('request_id', 'Request id')}${field('serial', 'Serial')}${field('key_id', 'Key id')}
      ${field('user', 'User (object id)')}${field('policy', 'Policy')}${field('since', 'From', 'datetime-local')}${field('until', 'To', 'datetime-local')}
      <button type="submit">Search</button>
    </form>
    <${ErrorBox} error=${error} />
    ${result ? html`
      ${result.chain_intact !== undefined ? html`<p id="chain" class=${result.chain_intact ? 'ok' : 'error'} role="status">
        ${result.chain_intact ? 'The request\u2019s audit chain verifies: every entry is intact and linked.' : 'The request\u2019s audit chain does NOT verify.'}</p>` : null}
      ${!result.entries.length ? html`<p class="muted">No entries.</p>` : html`
      <div class="table"><table id="audit-entries">
        <thead><tr><th>When</th><th>What</th><th>Who</th><th>Policy</th><th>Request</th><th>Host</th><th>Intact</th></tr></thead>
        <tbody>${result.entries.map((e) => html`<tr>
          <td>${when(e.at)}</td><td>${e.action}${e.error_code ? html` <small>${e.error_code}</small>` : null}</td>
          <td>${e.actor_oid ? html`<button type="button" class="link" title="Entries of this user"
            onClick=${() => byUser(e.actor_oid)}>${e.actor_upn || e.actor_oid}</button>` : '-'}</td><td>${e.policy_id || '-'}</td>
          <td>${e.request_id ? html`<a href=${`/app/requests/${e.request_id}`}>${e.request_id}</a>` : '-'}</td>
          <td>${e.principal ? `${e.principal}@` : ''}${e.host || ''}</td><td>${e.intact ? 'yes' : 'NO'}</td></tr>`)}
        </tbody></table></div>
      ${result.next ? html`<button type="button" onClick=${more}>More</button>` : null}`}` : null}
    <h2>Last 14 days, per policy</h2>
    <${Charts} />`;
}
