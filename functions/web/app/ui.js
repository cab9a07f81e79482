// Shared pieces: the template tag, hooks, formatting, and small components.
// Every value from the API is rendered as text (Preact escapes it); no HTML is ever built from data.
import { h, render } from './vendor/preact.js';
import { useCallback, useEffect, useRef, useState } from './vendor/preact-hooks.js';
import htm from './vendor/htm.js';
import { page } from './api.js';

export const html = htm.bind(h);
export { render, useCallback, useEffect, useRef, useState };

export function when(ts) {
  if (ts === null || ts === undefined) return '-';
  return new Date(Number(ts) * 1000).toLocaleString();
}

export function ago(ts, now = Date.now() / 1000) {
  const s = Math.max(0, Math.round(now - Number(ts)));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function duration(seconds) {
  const s = Number(seconds);
  if (!Number.isFinite(s)) return '-';
  if (s % 3600 === 0 && s >= 3600) return `${s / 3600} h`;
  if (s >= 60) return `${Math.round(s / 60)} min`;
  return `${s} s`;
}

// A person as the API names them: display name first, the UPN after it.
export function Person({ name, upn }) {
  if (name && upn && name !== upn) return html`<span class="person">${name} <small>${upn}</small></span>`;
  return html`<span class="person">${name || upn || '-'}</span>`;
}

export function ErrorBox({ error }) {
  if (!error) return null;
  const text = error.message || String(error);
  return html`<p class="error" role="alert">${text}${error.requestId ? html` <small>(request id ${error.requestId})</small>` : null}</p>`;
}

export function State({ value }) {
  return html`<span class=${`state state-${value}`}>${value}</span>`;
}

// Run `load` now and every `everyMs` while the page is visible; returns [data, error, reload].
export function usePoll(load, deps, everyMs = 0) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const alive = useRef(true);
  const reload = useCallback(async () => {
    try {
      const d = await load();
      if (alive.current) { setData(d); setError(null); }
    } catch (e) {
      if (alive.current) setError(e);
    }
  }, deps);
  useEffect(() => {
    alive.current = true;
    reload();
    let timer = null;
    if (everyMs) {
      timer = setInterval(() => { if (document.visibilityState === 'visible') reload(); }, everyMs);
    }
    return () => { alive.current = false; if (timer) clearInterval(timer); };
  }, [reload]);
  return [data, error, reload];
}

export function navigate(path) {
  history.pushState(null, '', path);
  window.dispatchEvent(new Event('popstate'));
}

// A list the API pages: the first page (read again every `everyMs`), and further pages on `more()`
// (following `next`). Items are kept once by id.
export function usePaged(path, key, everyMs = 0) {
  const [extra, setExtra] = useState({ items: [], next: undefined });
  const [first, error] = usePoll(() => page(path, key), [path], everyMs);
  const seen = new Set();
  const items = first ? first.items.concat(extra.items).filter((x) => {
    const id = x.id ?? JSON.stringify(x);
    if (seen.has(id)) return false;
    seen.add(id);
    return true;
  }) : null;
  const next = extra.next === undefined ? first && first.next : extra.next;
  const more = async () => {
    const p = await page(path, key, next);
    setExtra({ items: extra.items.concat(p.items), next: p.next });
  };
  return { items, next, more, error };
}
