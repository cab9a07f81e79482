// The API on this origin, called with the signed-in user's bearer token. No cookies are sent.
import { accessToken } from './auth.js';

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `The service answered HTTP ${status}.`);
    this.status = status;
    this.code = body && body.error;
    this.body = body || {};
    this.requestId = body && body.request_id;
  }
}

export async function call(path, { method = 'GET', body, ifMatch } = {}) {
  const headers = { Authorization: `Bearer ${await accessToken()}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (ifMatch) headers['If-Match'] = ifMatch;
  const resp = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'omit', cache: 'no-store', redirect: 'error',
  });
  const type = resp.headers.get('Content-Type') || '';
  const data = type.includes('application/json') ? await resp.json() : await resp.text();
  if (!resp.ok) throw new ApiError(resp.status, typeof data === 'object' ? data : { message: String(data).slice(0, 200) });
  return { data, etag: resp.headers.get('ETag'), status: resp.status };
}

export async function get(path) {
  return (await call(path)).data;
}

// One page of a list: `key` is the list's name in the answer; `next` the token for the following page.
export async function page(path, key, continuation) {
  const url = new URL(path, location.origin);
  if (continuation) url.searchParams.set('continuation', continuation);
  const data = await get(url.pathname + url.search);
  return { items: data[key] || [], next: data.next || null, data };
}

// Every page of a list, up to `max` items (for views that summarise, such as the audit chart).
export async function all(path, key, max = 5000) {
  let out = [];
  let next = null;
  do {
    const p = await page(path, key, next);
    out = out.concat(p.items);
    next = p.next;
  } while (next && out.length < max);
  return out;
}
