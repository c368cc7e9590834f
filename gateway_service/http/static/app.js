// What both pages share: the bearer token, calls to the JSON API, errors shown on the page, and
// number formatting. Plain ES modules served by the gateway: no framework, no build step.

const TOKEN_KEY = "rpcai.token";

// The token comes in the URL fragment (#token=..., which the browser never sends, so it never
// reaches an access log) or from the paste box. It is kept in sessionStorage (this tab only) and
// taken out of the address bar at once, so it is neither bookmarked nor shown.
function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token.trim());
    params.delete("token");
    setFragment(params);
  }
}

export function fragmentParams() {
  return new URLSearchParams(location.hash.slice(1));
}

export function setFragment(params) {
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
}

export class ApiError extends Error {
  constructor(status, reason, message) {
    super(message);
    this.status = status;
    this.reason = reason;
  }
}

// GET a JSON API path with the token; a refusal becomes an ApiError from the API's error body.
export async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new ApiError(401, "NO_TOKEN", "no token yet");
  let response;
  try {
    response = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "NETWORK", "the server could not be reached");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.reason || "", error.message || response.statusText);
  }
  return body;
}

// What the common refusals mean to the person looking at the page, and what to do about them.
const TITLES = {
  0: "Cannot reach the server",
  401: "Sign-in needed (401)",
  403: "Not allowed (403)",
  503: "Service unavailable (503)",
};
const ADVICE = {
  0: "Check your connection and try again.",
  401: "Your token is missing, invalid or expired: paste a new one.",
  403: "This token may not see this page.",
  503: "The service is unavailable for a moment: try again shortly.",
};

const $ = (id) => document.getElementById(id);

function showError(error) {
  const box = $("error");
  const status = error instanceof ApiError ? error.status : -1;
  box.dataset.status = String(status);
  box.replaceChildren();
  const title = document.createElement("strong");
  title.textContent = TITLES[status] || (status > 0 ? `Error ${status}` : "Error");
  const reason = error instanceof ApiError && error.reason ? ` (${error.reason})` : "";
  const detail = document.createElement("span");
  detail.textContent = `: ${error.message}${reason}. ${ADVICE[status] || ""}`;
  box.append(title, detail);
  if (status === 0 || status >= 500) {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "retry";
    retry.textContent = "Try again";
    box.append(" ", retry);
  }
  box.hidden = false;
  if (status === 401) askForToken();
  if (!(error instanceof ApiError)) console.error(error); // a bug in the page: say so loudly
}

function clearError() {
  $("error").hidden = true;
}

function askForToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("sign-in").hidden = false;
  $("sign-out").hidden = true;
  $("content").hidden = true;
}

// Runs `load` (which fills the page from the API) once a token is known, again on `Reload`
// buttons, and shows whatever it throws.
export function start(load) {
  takeTokenFromFragment();
  let loads = 0;
  const run = async () => {
    clearError();
    document.body.classList.add("loading");
    try {
      if (!sessionStorage.getItem(TOKEN_KEY)) return askForToken();
      $("sign-in").hidden = true;
      $("sign-out").hidden = false;
      $("content").hidden = false; // before drawing: the charts take their width from the page
      await load();
    } catch (error) {
      $("content").hidden = true;
      showError(error);
    } finally {
      document.body.classList.remove("loading");
      document.body.dataset.loaded = String(++loads); // tests wait for this to change
    }
  };
  $("sign-in").addEventListener("submit", (event) => {
    event.preventDefault(); // never a real submission: the token would leave in a request
    const input = event.target.elements.token;
    const token = input.value.trim();
    input.value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    run();
  });
  $("sign-out").addEventListener("click", () => {
    clearError();
    askForToken();
  });
  $("error").addEventListener("click", (event) => {
    if (event.target.closest("button.retry")) run();
  });
  for (const button of document.querySelectorAll("[data-reload]")) {
    button.addEventListener("click", run);
  }
  run();
  return run;
}

// ---- formatting ------------------------------------------------------------------------------

const group = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");

// Integers as the API sends them (numbers, or strings for int64 in some JSON encoders).
export const num = (value) => Number(value ?? 0);
export const int = (value) => (value == null ? "—" : num(value).toLocaleString("en-US"));

// An exact decimal dollar string ("12.340000") shown exactly, at least to the cent: "$12.34".
export function usd(text) {
  if (text == null) return "—";
  const negative = text.startsWith("-");
  const [whole, fraction = ""] = text.replace("-", "").split(".");
  const cents = fraction.replace(/0+$/, "").padEnd(2, "0");
  return `${negative ? "-" : ""}$${group(whole)}.${cents}`;
}

// Integer micro-dollars as the exact decimal string the API uses: 7500 -> "0.007500".
export function microToUsd(micro) {
  const sign = micro < 0 ? "-" : "";
  const digits = String(Math.abs(micro)).padStart(7, "0");
  return `${sign}${digits.slice(0, -6)}.${digits.slice(-6)}`;
}

// "2026-12-01T13:05:09.123Z" -> "2026-12-01 13:05" (the pages speak UTC throughout).
export const utcMinute = (iso) => iso.slice(0, 16).replace("T", " ");

// ---- building the page -----------------------------------------------------------------------

// Cards of [label, value, data-testid, note?]; everything goes in as text, never as HTML.
export function fillCards(container, cards) {
  container.replaceChildren(
    ...cards.map(([label, value, testid, note]) => {
      const card = document.createElement("div");
      card.className = "stat";
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      const figure = document.createElement("span");
      figure.className = "value";
      figure.textContent = value;
      if (testid) figure.dataset.testid = testid;
      card.append(name, figure);
      if (note) {
        const small = document.createElement("small");
        small.textContent = note;
        card.append(small);
      }
      return card;
    }),
  );
}

// A table of `columns` ([heading, row => text, {numeric}]) over `rows`; `empty` when none.
export function fillTable(table, columns, rows, empty = "Nothing yet.") {
  const head = document.createElement("tr");
  for (const [heading, , options] of columns) {
    const th = document.createElement("th");
    th.textContent = heading;
    th.scope = "col";
    if (options?.numeric) th.className = "num";
    head.append(th);
  }
  const body = rows.map((row) => {
    const tr = document.createElement("tr");
    for (const [, cell, options] of columns) {
      const td = document.createElement("td");
      td.textContent = cell(row);
      if (options?.numeric) td.className = "num";
      tr.append(td);
    }
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = columns.length;
    td.className = "empty";
    td.textContent = empty;
    tr.append(td);
    body.push(tr);
  }
  table.replaceChildren(document.createElement("thead"), document.createElement("tbody"));
  table.tHead.append(head);
  table.tBodies[0].append(...body);
}
