// The operator's dashboard: what the platform sold, earned and spent at the providers, and who
// used it, per period of a UTC range: one call to GET /v1/admin/analytics with an admin token.
import {
  ApiError,
  api,
  fillCards,
  fillTable,
  fragmentParams,
  int,
  microToUsd,
  num,
  setFragment,
  start,
  usd,
} from "./app.js";
import { barChart, lineChart, rankChart } from "./charts.js";

const DAY_MS = 86_400_000;
const HOUR_MS = 3_600_000;
const MAX_PERIODS = 744; // the API's bound: 31 days of hours
const GRANULARITIES = ["hour", "day", "month"];
const $ = (id) => document.getElementById(id);
const dollars = (micro) => num(micro) / 1e6;
const modelOf = (m) => `${m.provider}/${m.model}`;

// datetime-local inputs hold "YYYY-MM-DDTHH:MM" with no zone: the page reads them as UTC.
const toInput = (ms) => new Date(ms).toISOString().slice(0, 16);

function fromInput(value, name) {
  const ms = Date.parse(value.length === 16 ? value + ":00Z" : value + "Z");
  if (Number.isNaN(ms)) throw new ApiError(400, "INVALID_RANGE", `give a ${name} date and time`);
  return new Date(ms).toISOString().replace(".000Z", "Z");
}

// The range comes from the fragment (#start=...&end=...&granularity=..., so a view can be
// bookmarked or shared without its token), else the last 30 UTC days.
function initialRange() {
  const params = fragmentParams();
  const tomorrow = Math.floor(Date.now() / DAY_MS) * DAY_MS + DAY_MS;
  const given = (name, fallback) => {
    const ms = Date.parse(params.get(name));
    return Number.isNaN(ms) ? fallback : ms;
  };
  $("start").value = toInput(given("start", tomorrow - 30 * DAY_MS));
  $("end").value = toInput(given("end", tomorrow));
  const granularity = params.get("granularity");
  if (GRANULARITIES.includes(granularity)) $("granularity").value = granularity;
}

// The API takes a start and a number of whole UTC periods: the periods that [start, end) touches.
function periodsBetween(startIso, endIso, granularity) {
  const from = new Date(startIso);
  const to = Date.parse(endIso);
  if (granularity === "month") {
    let months = 0;
    const at = Date.UTC(from.getUTCFullYear(), from.getUTCMonth(), 1);
    const cursor = new Date(at);
    while (cursor.getTime() < to && months <= MAX_PERIODS) {
      months += 1;
      cursor.setUTCMonth(cursor.getUTCMonth() + 1);
    }
    return months;
  }
  const size = granularity === "hour" ? HOUR_MS : DAY_MS;
  const first = Math.floor(from.getTime() / size) * size;
  return Math.ceil((to - first) / size);
}

function periodLabel(iso, granularity) {
  if (granularity === "hour") return `${iso.slice(5, 10)} ${iso.slice(11, 13)}h`;
  if (granularity === "month") return iso.slice(0, 7);
  return iso.slice(5, 10);
}

// Payments by currency, in major units: {currency: "EUR", amountMinor: 1234} -> "EUR 12.34".
function revenueByCurrency(revenue) {
  return (revenue || [])
    .map(({ currency, amountMinor }) => {
      let digits = 2; // an unknown code: cents, the common case
      try {
        const format = new Intl.NumberFormat("en", { style: "currency", currency });
        digits = format.resolvedOptions().maximumFractionDigits;
      } catch {}
      return `${currency || "?"} ${(num(amountMinor) / 10 ** digits).toFixed(digits)}`;
    })
    .join(" · ");
}

const percent = (part, whole) => (whole ? `${((100 * part) / whole).toFixed(1)}%` : "—");
const unpriced = (count) =>
  num(count) ? `${int(count)} calls of unpriced models not included` : "";

function renderTotals(a) {
  const t = a.totals;
  const withoutAmount = num(t.purchasesWithoutAmount)
    ? `${int(t.purchasesWithoutAmount)} purchases without an amount`
    : "";
  const users = [
    `${int(t.subscriptionUsers)} subscription`,
    `${int(t.byokUsers)} BYOK`,
    `${int(t.publicByokRequests)} public BYOK calls`,
  ];
  const margin = percent(num(t.grossMarginMicroUsd), num(t.revenueMicroUsd));
  // [label, value, data-testid, note]
  fillCards($("totals"), [
    ["Revenue", usd(t.revenueUsd), "revenue-usd",
      [revenueByCurrency(t.revenue), withoutAmount].filter(Boolean).join("; ")],
    ["Provider cost (est.)", usd(t.providerCostUsd), "provider-cost-usd",
      unpriced(t.unknownCostRequests)],
    ["Gross margin", usd(t.grossMarginUsd), "gross-margin-usd", `${margin} of revenue`],
    ["Purchases", int(t.purchases), "purchases", `${int(t.tokensSold)} tokens sold`],
    ["Tokens credited", int(t.tokensCredited), "tokens-credited",
      `platform fee ${int(t.purchaseFeeTokens)}`],
    ["Calls", int(t.requests), "requests", `${int(t.providerTokensUsed)} provider tokens`],
    ["Tokens charged", int(t.tokensCharged), "tokens-charged",
      `usage fee ${int(t.usageFeeTokens)}`],
    ["Active users", int(t.activeUsers), "active-users", users.join(" · ")],
    ["Tokens refunded", int(t.tokensRefunded), "tokens-refunded",
      `shortfall (owed) ${int(t.shortfallTokens)}`],
    ["Unbilled tokens", int(t.unbilledTokens), "unbilled-tokens", "expired holds, overruns"],
    ["BYOK cost (users' keys)", usd(t.byokCostUsd), "byok-cost-usd"],
    ["Revenue per token", usd(microToUsd(num(a.revenuePerTokenMicroUsd))), "revenue-per-token"],
  ]);
  fillCards($("now"), [
    ["Owed by users", int(a.openReceivableTokens), "open-receivable-tokens",
      "refunds not yet collected"],
    ["Open holds", int(a.openHolds), "open-holds", `${int(a.heldTokens)} tokens held`],
  ]);
}

function renderPeriods(a, granularity) {
  const periods = a.periods || [];
  const labels = periods.map((p) => periodLabel(p.start, granularity));
  // [[series name, figures key], ...] -> chart series over the periods
  const series = (pairs, value = num) =>
    pairs.map(([name, key]) => ({ name, values: periods.map((p) => value(p.figures[key])) }));
  barChart($("money-chart"), {
    title: "Revenue vs provider cost per period",
    labels,
    unit: "usd",
    series: series(
      [
        ["Revenue", "revenueMicroUsd"],
        ["Provider cost", "providerCostMicroUsd"],
        ["Gross margin", "grossMarginMicroUsd"],
      ],
      dollars,
    ),
  });
  lineChart($("tokens-chart"), {
    title: "Tokens per period",
    labels,
    integer: true,
    series: series([
      ["Tokens sold", "tokensSold"],
      ["Tokens charged", "tokensCharged"],
      ["Provider tokens used", "providerTokensUsed"],
    ]),
  });
  barChart($("refunds-chart"), {
    title: "Refunded, shortfall and unbilled tokens per period",
    labels,
    integer: true,
    series: series([
      ["Refunded", "tokensRefunded"],
      ["Shortfall (owed)", "shortfallTokens"],
      ["Unbilled", "unbilledTokens"],
    ]),
  });
  lineChart($("users-chart"), {
    title: "Active users per period",
    labels,
    integer: true,
    series: series([
      ["Active users", "activeUsers"],
      ["Subscription", "subscriptionUsers"],
      ["BYOK", "byokUsers"],
      ["Public BYOK calls", "publicByokRequests"],
    ]),
  });
  // Tokens by model over time: the busiest models of the range, the rest as one series (the
  // palette has seven colours).
  const ranked = (a.models || []).map(modelOf);
  const shown = ranked.slice(0, ranked.length > 7 ? 6 : 7);
  const tokensOf = (p, keep) =>
    (p.models || [])
      .filter((m) => keep(modelOf(m)))
      .reduce((sum, m) => sum + num(m.providerTokensUsed), 0);
  const byModel = shown.map((name) => ({
    name,
    values: periods.map((p) => tokensOf(p, (m) => m === name)),
  }));
  if (ranked.length > shown.length) {
    byModel.push({
      name: "other models",
      values: periods.map((p) => tokensOf(p, (m) => !shown.includes(m))),
    });
  }
  barChart($("models-time-chart"), {
    title: "Provider tokens used, by model, per period",
    labels,
    integer: true,
    stacked: true,
    series: byModel,
  });
  const figure = (key, show = int) => (p) => show(p.figures[key]);
  const numeric = { numeric: true };
  fillTable($("periods"), [
    ["Period (UTC)", (p) => p.start.replace("T", " ").replace(":00:00Z", ":00")],
    ["Revenue", figure("revenueUsd", usd), numeric],
    ["Provider cost", figure("providerCostUsd", usd), numeric],
    ["Margin", figure("grossMarginUsd", usd), numeric],
    ["Purchases", figure("purchases"), numeric],
    ["Tokens sold", figure("tokensSold"), numeric],
    ["Calls", figure("requests"), numeric],
    ["Tokens charged", figure("tokensCharged"), numeric],
    ["Refunded", figure("tokensRefunded"), numeric],
    ["Shortfall", figure("shortfallTokens"), numeric],
    ["Unbilled", figure("unbilledTokens"), numeric],
    ["Active users", figure("activeUsers"), numeric],
  ], periods, "No periods.");
}

function renderRankings(a) {
  const numeric = { numeric: true };
  const byTokens = (x, y) => num(y.providerTokensUsed) - num(x.providerTokensUsed);
  const models = [...(a.models || [])].sort(byTokens);
  rankChart($("models-chart"), {
    title: "Provider tokens used by model",
    rows: models.map((m) => ({ label: modelOf(m), value: num(m.providerTokensUsed) })),
  });
  fillTable($("models"), [
    ["Model", modelOf],
    ["Calls", (m) => int(m.requests), numeric],
    ["Provider tokens", (m) => int(m.providerTokensUsed), numeric],
    ["Tokens charged", (m) => int(m.tokensCharged), numeric],
    ["Provider cost", (m) => usd(m.providerCostUsd), numeric],
    ["BYOK cost", (m) => usd(m.byokCostUsd), numeric],
    ["Margin", (m) => usd(m.grossMarginUsd), numeric],
  ], models, "No calls in this range.");

  const users = a.topUsers || [];
  rankChart($("users-rank"), {
    title: "Top users by tokens charged",
    rows: users.map((u) => ({ label: u.userId, value: num(u.tokensCharged) })),
  });
  fillTable($("top-users"), [
    ["User", (u) => u.userId],
    ["Calls", (u) => int(u.requests), numeric],
    ["Tokens charged", (u) => int(u.tokensCharged), numeric],
    ["Provider tokens", (u) => int(u.providerTokensUsed), numeric],
  ], users, "No calls in this range.");

  const sources = a.sources || [];
  const sourceOf = (s) => s.source || "(none)";
  rankChart($("sources-chart"), {
    title: "Revenue by purchase source",
    unit: "usd",
    rows: sources.map((s) => ({ label: sourceOf(s), value: dollars(s.revenueMicroUsd) })),
  });
  fillTable($("sources"), [
    ["Source", sourceOf],
    ["Purchases", (s) => int(s.purchases), numeric],
    ["Tokens sold", (s) => int(s.tokensSold), numeric],
    ["Revenue", (s) => usd(s.revenueUsd), numeric],
  ], sources, "No purchases in this range.");
}

initialRange();
const reload = start(async () => {
  const range = {
    start: fromInput($("start").value, "start"),
    end: fromInput($("end").value, "end"),
    granularity: $("granularity").value,
  };
  if (Date.parse(range.end) <= Date.parse(range.start)) {
    throw new ApiError(400, "INVALID_RANGE", "the end must be after the start");
  }
  const periods = periodsBetween(range.start, range.end, range.granularity);
  if (periods > MAX_PERIODS) {
    throw new ApiError(
      400,
      "INVALID_RANGE",
      `at most ${MAX_PERIODS} periods: choose a shorter range or a coarser granularity`,
    );
  }
  setFragment(new URLSearchParams(range));
  const query = new URLSearchParams({
    start: range.start,
    periods: String(periods),
    granularity: range.granularity,
    top_users: "10",
  });
  const analytics = await api(`/v1/admin/analytics?${query}`);
  renderTotals(analytics);
  renderPeriods(analytics, range.granularity);
  renderRankings(analytics);
});
$("range").addEventListener("submit", (event) => {
  event.preventDefault();
  reload();
});
