#!/usr/bin/env node
// End-to-end browser test: order food through the chat page, confirm the
// payment in the page's dialog, and see it paid.
//
//   node_dir=$(scripts/browser-deps.sh | tail -1)
//   ERRAND_NODE_DIR=$node_dir node tests/browser/order_food.mjs \
//       'http://127.0.0.1:8080/#token=tok-…' target/screenshots
//
// Environment:
//   ERRAND_NODE_DIR   where playwright-core is installed
//                     (default: ~/.cache/errand/node, as browser-deps.sh)
//   CHROMIUM          the browser (default /usr/bin/chromium)
//   ERRAND_CONFIRM_TIMEOUT_S / ERRAND_PAID_TIMEOUT_S   override the waits
//                     (default 900 s for the dialog, 180 s for the payment)
//
// Writes chat-confirm.png and chat-paid.png (chat-fail.png on failure) to
// the screenshot dir and prints one JSON line on stdout:
//   {"ok":true,"amount":"¥43.00","order_status":"preparing",…}
// Any failure exits non-zero with the reason and the page's visible text on
// stderr.
//
// How it knows the assistant is idle: the page sets body[data-busy] to
// "true" from the moment an input is sent until the server's `done` for it
// (the Stop button is visible exactly then). When the page has been idle for
// a few seconds and no confirmation dialog is open, but the last card offers
// options (a restaurant or a dish to pick), the test taps the first option
// and waits again — at most 4 times.

import { createRequire } from "node:module";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const MESSAGE =
  "Order kung pao chicken from the best Sichuan restaurant near People's Square, deliver to 200 Renmin Road, Huangpu";
const MAX_PICKS = 4;
const IDLE_SETTLE_MS = 4000; // idle this long = the reply is over
const CONFIRM_TIMEOUT_MS = Number(process.env.ERRAND_CONFIRM_TIMEOUT_S || 900) * 1000;
const PAID_TIMEOUT_MS = Number(process.env.ERRAND_PAID_TIMEOUT_S || 180) * 1000;
const ORDER_WAIT_MS = 20000;

const [url, shotDir] = process.argv.slice(2);
if (!url || !shotDir) {
  console.error("usage: node tests/browser/order_food.mjs <page-url-with-#token=...> <screenshot-dir>");
  process.exit(2);
}

const started = Date.now();
const log = (...a) => console.error(`[order_food ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function loadPlaywright() {
  const nodeDir = process.env.ERRAND_NODE_DIR || path.join(os.homedir(), ".cache", "errand", "node");
  const require = createRequire(path.join(path.resolve(nodeDir), "package.json"));
  try {
    return require("playwright-core");
  } catch (e) {
    console.error(`error: playwright-core not found under ${nodeDir}/node_modules (${e.code || e.message});`);
    console.error("       run scripts/browser-deps.sh and set ERRAND_NODE_DIR to the directory it prints");
    process.exit(2);
  }
}

const { chromium } = loadPlaywright();
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!fs.existsSync(executablePath)) {
  console.error(`error: no browser at ${executablePath}; run scripts/browser-deps.sh or set CHROMIUM`);
  process.exit(2);
}
fs.mkdirSync(shotDir, { recursive: true });

const consoleLines = [];
let browser;
let page;

class TestFailure extends Error {}
const fail = (msg) => {
  throw new TestFailure(msg);
};

async function visible(selector) {
  return page.locator(selector).first().isVisible().catch(() => false);
}

async function busy() {
  return (await page.getAttribute("body", "data-busy").catch(() => null)) === "true";
}

async function connectionState() {
  return page.getAttribute("#status", "data-state").catch(() => null);
}

/** Clicks the first option of the last card that still has enabled options. */
async function pickFromLastCard() {
  const cards = page.locator(".card");
  const n = await cards.count();
  if (!n) return null;
  const last = cards.nth(n - 1);
  const button = last.locator("button[data-option]:not([disabled])").first();
  if (!(await button.count())) return null;
  const label = (await button.innerText()).trim();
  const option = await button.getAttribute("data-option");
  await button.click();
  return { option, label, card: await last.getAttribute("data-card") };
}

async function waitForConfirmation() {
  const deadline = Date.now() + CONFIRM_TIMEOUT_MS;
  let picks = 0;
  let idleSince = null;
  let lastState = null;
  while (Date.now() < deadline) {
    if (await visible("#confirm-dialog[open]")) return picks;
    const state = await connectionState();
    if (state !== lastState) {
      log(`connection: ${state}`);
      lastState = state;
    }
    if (state === "unauthorized") fail("the server did not accept the token");
    if (await visible(".payment[data-status]")) fail("a payment appeared before any confirmation was asked");

    if (await busy()) {
      idleSince = null;
    } else {
      idleSince ??= Date.now();
      if (Date.now() - idleSince >= IDLE_SETTLE_MS && state === "open") {
        if (picks >= MAX_PICKS) fail(`no confirmation dialog after ${MAX_PICKS} card picks`);
        const picked = await pickFromLastCard();
        if (!picked) fail("the assistant finished its reply without a confirmation dialog or a card to pick from");
        picks += 1;
        log(`reply done without confirmation; picked option ${picked.option} (${picked.label}) of card ${picked.card}`);
        idleSince = null;
        await sleep(500);
        continue;
      }
    }
    await sleep(500);
  }
  fail(`no confirmation dialog within ${CONFIRM_TIMEOUT_MS / 1000} s`);
}

async function main() {
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  const context = await browser.newContext({
    viewport: { width: 430, height: 900 }, // a phone-sized screen
    deviceScaleFactor: 2,
    locale: "en-US",
  });
  page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") consoleLines.push(`console.${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  page.on("websocket", (ws) => ws.on("close", () => log("websocket closed")));

  log(`opening ${url.replace(/token=[^&]*/, "token=…")}`);
  const resp = await page.goto(url, { waitUntil: "domcontentloaded", timeout: 30000 });
  if (resp && !resp.ok()) fail(`GET page answered HTTP ${resp.status()}`);
  await page
    .waitForSelector('#status[data-state="open"]', { timeout: 60000 })
    .catch(async () => fail(`the chat did not connect (status: ${await connectionState()})`));
  log("connected");

  await page.fill("#input", MESSAGE);
  await page.click("#send");
  log("message sent; waiting for the confirmation dialog");

  const picks = await waitForConfirmation();
  const amount = (await page.innerText("#confirm-amount")).trim();
  const summary = (await page.innerText("#confirm-summary")).trim();
  log(`confirmation: ${summary} — ${amount}`);
  if (!amount) fail("the confirmation dialog shows no amount");
  await page.screenshot({ path: path.join(shotDir, "chat-confirm.png") });

  await page.click("#confirm-yes");
  await page.waitForSelector("#confirm-dialog[open]", { state: "hidden", timeout: 5000 });
  log("confirmed; waiting for the payment");

  const paidDeadline = Date.now() + PAID_TIMEOUT_MS;
  for (;;) {
    if (await visible('.payment[data-status="paid"]')) break;
    if (await visible('.payment[data-status="failed"]')) {
      fail(`the payment failed: ${(await page.innerText('.payment[data-status="failed"]')).trim()}`);
    }
    if (Date.now() > paidDeadline) fail(`no paid payment within ${PAID_TIMEOUT_MS / 1000} s of confirming`);
    await sleep(500);
  }
  const paidText = (await page.locator('.payment[data-status="paid"]').last().innerText())
    .replace(/^\s*[✓✗?]\s*/, "")
    .replace(/\s+/g, " ")
    .trim();
  log(`payment: ${paidText}`);

  let orderStatus = null;
  try {
    await page.waitForSelector(".order-status", { timeout: ORDER_WAIT_MS });
    orderStatus = await page.locator(".order-status").last().getAttribute("data-status");
    log(`order status: ${orderStatus}`);
  } catch {
    log(`no order status update within ${ORDER_WAIT_MS / 1000} s (not required)`);
  }
  // Let the reply finish so the screenshot shows the closing words.
  const settle = Date.now() + 30000;
  while ((await busy()) && Date.now() < settle) await sleep(500);
  await page.screenshot({ path: path.join(shotDir, "chat-paid.png") });

  const summaryLine = {
    ok: true,
    amount,
    paid: paidText,
    order_status: orderStatus,
    picks,
    seconds: Math.round((Date.now() - started) / 100) / 10,
  };
  process.stdout.write(JSON.stringify(summaryLine) + "\n");
}

try {
  await main();
  await browser.close();
  process.exit(0);
} catch (e) {
  console.error(`FAIL: ${e instanceof TestFailure ? e.message : e.stack || e}`);
  if (page) {
    await page.screenshot({ path: path.join(shotDir, "chat-fail.png") }).catch(() => {});
    const text = await page.innerText("body").catch(() => "(page text unavailable)");
    console.error("---- visible page text ----");
    console.error(text);
    console.error("---- end of page text ----");
  }
  if (consoleLines.length) console.error(consoleLines.join("\n"));
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}
