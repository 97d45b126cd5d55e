// Drives the web console in Debian's Chromium (playwright-core, never a downloaded browser).
// Run by tests/ui.rs, which starts the daemon and passes: BASE, TOKEN, RUNNING_ID (a task
// that sleeps), FAILED_ID (a task that failed), OBJECTIVE_ID, SHOTS (screenshot folder).
// While the pool is held at 100 % by tests/ui.rs, the overview must show it and the held
// sessions; the script prints HELD-OK and tests/ui.rs lets them go. Any failed check
// throws: the process exits non-zero with the reason.
import { chromium } from 'playwright-core';

const { BASE, TOKEN, RUNNING_ID, FAILED_ID, OBJECTIVE_ID, SHOTS, LEAKED_APP } = process.env;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function check(ok, what) {
  if (!ok) throw new Error('check failed: ' + what);
  console.log('ok: ' + what);
}

async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = Object.assign({ Authorization: 'Bearer ' + TOKEN }, o.body ? { 'Content-Type': 'application/json' } : {});
  const r = await fetch(BASE + path, o);
  return r.json();
}

async function until(what, f, ms = 20000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await f();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error('timed out waiting for: ' + what);
}

// page.waitForFunction polls by evaluating strings, which the console's Content Security
// Policy forbids (as it should); this polls with page.evaluate instead.
async function waitFor(page, fn, arg, ms = 20000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await page.evaluate(fn, arg)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('timed out waiting in the page for: ' + fn.toString().slice(0, 160));
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const outside = [];
  page.on('request', (r) => { if (!r.url().startsWith(BASE)) outside.push(r.url()); });
  const problems = [];
  page.on('pageerror', (e) => problems.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error' && !/401/.test(m.text())) problems.push(m.text()); });

  // Log in: one password field; the token is kept in the tab, never in a URL.
  await page.goto(BASE + '/ui');
  await page.waitForSelector('form.login');
  check(await page.locator('input[type=password]').count() === 1, 'the token form has one password field');
  await page.fill('input[type=password]', TOKEN);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForSelector('#pool-figures');
  check(!page.url().includes(TOKEN), 'the token is not in the URL');

  // The incident: the pool at 100 %, the held sessions listed with their callers.
  await waitFor(page, () => /in use 2 of 2 \(100%/.test(document.querySelector('#pool-figures')?.textContent || ''), null, 20000);
  check(true, 'the overview shows the pool at 100 %');
  await waitFor(page, () => {
    const rows = [...document.querySelectorAll('#sessions-table tbody tr')];
    return rows.filter((r) => /src\/.*\.rs:\d+/.test(r.textContent) && /pause/.test(r.textContent)).length >= 2;
  }, null, 20000);
  check(true, 'the held sessions appear with their caller and label');
  // Beside them, the applications' sessions: the leaked one under its rule, with its caller.
  await waitFor(page, (app) => {
    const rule = document.querySelector('[data-watch="leaky"]');
    return !!rule && [...rule.querySelectorAll('tbody tr')].some((r) => r.textContent.includes(app) && /idle in transaction/.test(r.textContent))
      && /client connections in use/.test(document.querySelector('#server-connections')?.textContent || '');
  }, LEAKED_APP, 20000);
  check(true, 'the overview lists a watched application\'s leaked session with its caller');
  await page.screenshot({ path: `${SHOTS}/overview-incident.png`, fullPage: true });
  console.log('HELD-OK');
  await waitFor(page, () => /in use [01] of 2/.test(document.querySelector('#pool-figures')?.textContent || ''), null, 30000);
  check(true, 'the overview follows the pool back down without a reload');

  // Keyboard: on a fresh load (still logged in: the token is in the tab's session), the
  // first Tab reaches the skip link, the next ones the navigation.
  await page.goto(BASE + '/ui');
  await page.waitForSelector('#pool-figures');
  await page.keyboard.press('Tab');
  check(await page.evaluate(() => document.activeElement?.className === 'skip'), 'keyboard: Tab reaches the skip link first');
  await page.keyboard.press('Tab');
  await page.keyboard.press('Tab');
  await page.keyboard.press('Tab');
  check(await page.evaluate(() => document.activeElement?.textContent === 'Tasks'), 'keyboard: then the brand, Overview, Tasks');

  // Cancel a running task from its page; the API says cancelled.
  page.on('dialog', (d) => d.accept());
  await page.goto(`${BASE}/ui/tasks/${RUNNING_ID}`);
  await waitFor(page, () => document.querySelector('#task-status')?.textContent === 'running');
  await page.getByRole('button', { name: 'Cancel' }).click();
  await until('task cancelled through the API', async () => (await api(`/v1/tasks/${RUNNING_ID}`)).status === 'cancelled');
  check(true, `task ${RUNNING_ID} cancelled from its page`);
  await waitFor(page, () => document.querySelector('#task-status')?.textContent === 'cancelled');
  await page.screenshot({ path: `${SHOTS}/task-cancelled.png`, fullPage: true });

  // Retry a failed one; the API shows the retry.
  await page.goto(`${BASE}/ui/tasks/${FAILED_ID}`);
  await waitFor(page, () => document.querySelector('#task-status')?.textContent === 'failed');
  await page.waitForSelector('#events-table tbody tr');
  const before = (await api(`/v1/tasks/${FAILED_ID}`)).attempts;
  await page.getByRole('button', { name: 'Retry' }).click();
  await until('retried through the API', async () => {
    const ev = await api(`/v1/tasks/${FAILED_ID}/events?limit=1000`);
    return ev.events.some((e) => e.kind === 'retried');
  });
  check(true, `task ${FAILED_ID} retried from its page (it had ${before} attempt(s))`);
  // Its new attempt's events arrive on the page live.
  await waitFor(page, () => [...document.querySelectorAll('#events-table tbody tr')].some((r) => /retried/.test(r.textContent)));
  check(true, 'the retried event shows on the task page live');
  await page.screenshot({ path: `${SHOTS}/task-retried.png`, fullPage: true });

  // The overview updates without a reload when a task finishes.
  await page.goto(`${BASE}/ui`);
  await page.waitForSelector('[data-count=succeeded]');
  await waitFor(page, () => /^\d+$/.test(document.querySelector('[data-count=succeeded]').textContent));
  await page.evaluate(() => { window.__sameDocument = true; });
  const n = Number(await page.textContent('[data-count=succeeded]'));
  await api('/v1/tasks', { method: 'POST', body: JSON.stringify({ agent: 'ok' }) });
  await waitFor(page, (k) => Number(document.querySelector('[data-count=succeeded]').textContent) > k, n, 20000);
  check(await page.evaluate(() => window.__sameDocument === true), 'the succeeded count grew without a reload');
  await page.screenshot({ path: `${SHOTS}/overview.png`, fullPage: true });

  // The other pages draw.
  await page.goto(`${BASE}/ui/tasks?status=cancelled`);
  await page.waitForSelector('#tasks-table tbody tr a');
  check((await page.textContent('#tasks-table')).includes(`#${RUNNING_ID}`), 'the tasks page lists tasks by filter');
  await page.screenshot({ path: `${SHOTS}/tasks.png`, fullPage: true });
  await page.goto(`${BASE}/ui/agents`);
  await page.waitForSelector('#agents-table tbody tr');
  check((await page.textContent('#agents-table')).includes('slow'), 'the agents page lists the agents');
  await page.screenshot({ path: `${SHOTS}/agents.png`, fullPage: true });
  await page.goto(`${BASE}/ui/objectives/${OBJECTIVE_ID}`);
  await page.waitForSelector('.steps li');
  check(await page.locator('.steps ol').count() === 2, 'the objective shows its steps in two dependency levels');
  await page.screenshot({ path: `${SHOTS}/objective.png`, fullPage: true });

  // Readable on a phone.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${BASE}/ui`);
  await page.waitForSelector('#pool-figures');
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `no sideways scrolling on a phone (${overflow}px)`);
  await page.screenshot({ path: `${SHOTS}/overview-phone.png`, fullPage: true });

  check(outside.length === 0, 'no request left the daemon: ' + outside.join(' '));
  check(problems.length === 0, 'no script error: ' + problems.join(' | '));
} finally {
  await browser.close();
}
