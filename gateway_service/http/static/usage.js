// The signed-in user's page: balance, usage per day and per model, purchases; all from the JSON
// API (/v1/me/status, /v1/me/usage, /v1/me/purchases) with the user's own token.
import { api, fillCards, fillTable, int, microToUsd, num, start, usd, utcMinute } from "./app.js";
import { barChart, rankChart } from "./charts.js";

const DAY_MS = 86_400_000;
const MAX_PURCHASE_PAGES = 50; // 5,000 purchases at 100 a page: enough for any one person
const TOP_MODELS = 6; // the rest is one "other" series, so each colour stays distinct

const $ = (id) => document.getElementById(id);
const modelOf = (record) => `${record.provider}/${record.model}`;
const utcDay = (ms) => new Date(ms).toISOString().slice(0, 10);
const add = (map, key, amount) => map.set(key, (map.get(key) || 0) + amount);

async function allPurchases() {
  const purchases = [];
  let pageToken = null;
  for (let page = 0; page < MAX_PURCHASE_PAGES; page++) {
    const query = new URLSearchParams({ page_size: "100" });
    if (pageToken) query.set("page_token", pageToken);
    const answer = await api(`/v1/me/purchases?${query}`);
    purchases.push(...answer.purchases);
    pageToken = answer.nextPageToken;
    if (!pageToken) return { purchases, complete: true };
  }
  return { purchases, complete: false };
}

// Every UTC day of the window (and of any record outside it, should the clocks disagree), with
// the history's calls summed per day and per model.
function perDay(history, days) {
  const stamps = history.map((record) => Date.parse(record.createdAt));
  const first = Math.min(Date.now() - days * DAY_MS, ...stamps);
  const last = Math.max(Date.now(), ...stamps);
  const rows = new Map();
  for (let t = Date.parse(utcDay(first)); t <= last; t += DAY_MS) {
    const day = utcDay(t);
    rows.set(day, { day, requests: 0, tokens: 0, charged: 0, costMicro: 0, byModel: new Map() });
  }
  for (const record of history) {
    const row = rows.get(record.createdAt.slice(0, 10));
    const tokens = num(record.inputTokens) + num(record.outputTokens);
    row.requests += 1;
    row.tokens += tokens;
    row.charged += num(record.tokensCharged);
    row.costMicro += num(record.estimatedCostMicroUsd); // null (unpriced) counts as 0
    add(row.byModel, modelOf(record), tokens);
  }
  return [...rows.values()];
}

// One stacked series per model (the biggest ones; the rest summed as "other models").
function modelSeries(rows) {
  const totals = new Map();
  for (const row of rows) for (const [model, tokens] of row.byModel) add(totals, model, tokens);
  const models = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a));
  const shown = models.length > TOP_MODELS ? models.slice(0, TOP_MODELS - 1) : models;
  const series = shown.map((model) => ({
    name: model,
    values: rows.map((row) => row.byModel.get(model) || 0),
  }));
  if (shown.length < models.length) {
    const others = new Set(models.slice(shown.length));
    const sumOthers = (row) =>
      [...row.byModel].reduce((sum, [model, tokens]) => sum + (others.has(model) ? tokens : 0), 0);
    series.push({ name: "other models", values: rows.map(sumOthers) });
  }
  return series.length ? series : [{ name: "tokens", values: rows.map(() => 0) }];
}

function renderBalance(status) {
  const account = [status.userType, status.subscriptionTier].filter(Boolean).join(" · ");
  // [label, value, data-testid, note]
  const cards = [
    ["Available tokens", int(status.availableTokens), "available-tokens", `${account} account`],
    ["On hold (calls running)", int(status.reservedTokens), "reserved-tokens"],
  ];
  // Owed tokens (refunded payments already spent) are shown when the API reports them.
  if ("owedTokens" in status) {
    cards.push(["Owed", int(status.owedTokens), "owed-tokens", "taken from your next tokens"]);
  }
  if (status.month && num(status.month.quotaTokens) > 0) {
    const { usedTokens, quotaTokens, resetsAt } = status.month;
    const used = `${int(usedTokens)} of ${int(quotaTokens)}`;
    cards.push(["This month", used, "month-used", `resets ${utcMinute(resetsAt)} UTC`]);
  }
  fillCards($("balance"), cards);
}

function renderUsage(usage, days) {
  const { summary, breakdown, history } = usage;
  const unknown = num(summary.unknownCostRequests);
  fillCards($("summary"), [
    ["Calls", int(summary.totalRequests), "total-requests"],
    ["Tokens used", int(summary.totalTokens), "total-tokens"],
    ["Tokens charged", int(summary.tokensCharged), "tokens-charged"],
    ["Estimated cost", usd(summary.estimatedTotalCostUsd), "estimated-cost",
      unknown ? `${int(unknown)} calls of unpriced models not included` : ""],
  ]);

  // The API returns the newest 1,000 calls at most: say so when the days are partial.
  const note = $("history-note");
  const total = num(summary.totalRequests);
  note.hidden = history.length >= total;
  note.textContent =
    `Per-day figures cover the latest ${int(history.length)} of ${int(total)} calls.`;

  const numeric = { numeric: true };
  const rows = perDay(history, days);
  barChart($("per-day-chart"), {
    title: "Tokens used per day, by model",
    labels: rows.map((row) => row.day.slice(5)),
    series: modelSeries(rows),
    stacked: true,
    integer: true,
  });
  fillTable($("per-day"), [
    ["Day (UTC)", (row) => row.day],
    ["Calls", (row) => int(row.requests), numeric],
    ["Tokens used", (row) => int(row.tokens), numeric],
    ["Tokens charged", (row) => int(row.charged), numeric],
    ["Est. cost", (row) => usd(microToUsd(row.costMicro)), numeric],
  ], rows.filter((row) => row.requests).reverse(), "No calls in this window.");

  const byTokens = (a, b) => num(b.summary.totalTokens) - num(a.summary.totalTokens);
  const byModel = [...breakdown].sort(byTokens);
  rankChart($("per-model-chart"), {
    title: "Tokens used by model",
    rows: byModel.map((b) => ({ label: modelOf(b), value: num(b.summary.totalTokens) })),
  });
  fillTable($("per-model"), [
    ["Model", modelOf],
    ["Calls", (b) => int(b.summary.totalRequests), numeric],
    ["Tokens used", (b) => int(b.summary.totalTokens), numeric],
    ["Tokens charged", (b) => int(b.summary.tokensCharged), numeric],
    ["Est. cost", (b) => usd(b.summary.estimatedTotalCostUsd), numeric],
  ], byModel, "No calls in this window.");
}

function renderPurchases({ purchases, complete }) {
  const sum = (field) => purchases.reduce((total, p) => total + num(p[field]), 0);
  const numeric = { numeric: true };
  fillCards($("purchase-stats"), [
    ["Purchases", int(purchases.length) + (complete ? "" : "+"), "purchase-count"],
    ["Tokens credited", int(sum("tokensCredited")), "tokens-credited"],
    ["Tokens refunded", int(sum("tokensRefunded")), "tokens-refunded"],
  ]);
  fillTable($("purchases"), [
    ["Date (UTC)", (p) => utcMinute(p.createdAt)],
    ["Type", (p) => p.purchaseType.replace("_", "-")],
    ["Bought", (p) => int(p.tokensPurchased), numeric],
    ["Credited", (p) => int(p.tokensCredited), numeric],
    ["Fee", (p) => int(p.platformFeeTokens), numeric],
    ["Refunded", (p) => int(p.tokensRefunded), numeric],
  ], purchases, "No purchases yet.");
}

const reload = start(async () => {
  const days = Number($("days").value);
  const [status, usage, purchases] = await Promise.all([
    api("/v1/me/status"),
    api(`/v1/me/usage?days=${days}&include_history=true`),
    allPurchases(),
  ]);
  renderBalance(status);
  renderUsage(usage, days);
  renderPurchases(purchases);
});
$("days").addEventListener("change", reload);
