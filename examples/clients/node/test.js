'use strict'
// Tests for taskwarden-caller.js against a real PostgreSQL (no mocks).
//   TASKWARDEN_TEST_DATABASE_URL=postgresql://... node examples/clients/node/test.js
// Each check reads pg_stat_activity from a SEPARATE connection.
const assert = require('assert')
const fs = require('fs')
const os = require('os')
const path = require('path')
const pg = require('pg')
const { wrap, fit, callerName } = require('./taskwarden-caller')

const URL = process.env.TASKWARDEN_TEST_DATABASE_URL
if (!URL) { console.error('TASKWARDEN_TEST_DATABASE_URL is not set'); process.exit(2) }
const FILE = path.basename(__filename)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
function here () { return Number(/:(\d+):\d+\)?$/.exec(new Error().stack.split('\n')[2])[1]) }

let observer
async function appName (pid) {
  const r = await observer.query('SELECT application_name, state FROM pg_stat_activity WHERE pid = $1', [pid])
  return r.rows[0]
}
async function eventually (pid, want) { // release resets asynchronously: poll up to 3 s
  let row
  for (let i = 0; i < 60; i++) {
    row = await appName(pid)
    if (row && row.application_name === want) return row
    await sleep(50)
  }
  return row
}

async function openWithConnect (pool) {
  const line = here() + 1
  const client = await pool.connect()
  return { client, line }
}

async function testConnectAndRelease (pool) {
  const { client, line } = await openWithConnect(pool)
  const pid = client.processID
  try {
    const row = await appName(pid)
    assert.strictEqual(row.application_name, `app:${FILE}:${line}:openWithConnect`)
    assert.strictEqual(row.state, 'idle') // the SET opened no transaction
  } finally { client.release() }
  const after = await eventually(pid, 'app')
  assert.strictEqual(after.application_name, 'app')
  assert.strictEqual(after.state, 'idle')
}

async function queryFromKnownLine (pool) {
  const line = here() + 1
  const p = pool.query('SELECT pg_backend_pid() AS pid, pg_sleep(0.6) /* tw-marker-query */')
  return { p, line }
}

async function testPoolQuery (pool) {
  const { p, line } = await queryFromKnownLine(pool)
  let seen
  for (let i = 0; i < 40 && !seen; i++) {
    const r = await observer.query("SELECT pid, application_name FROM pg_stat_activity WHERE query LIKE '%tw-marker-' || 'query%' AND pid <> pg_backend_pid()")
    seen = r.rows[0]
    if (!seen) await sleep(25)
  }
  if (!seen) { await p.catch(() => {}); assert.fail('query never seen in pg_stat_activity') }
  assert.strictEqual(seen.application_name, `app:${FILE}:${line}:queryFromKnownLine`)
  const res = await p
  assert.strictEqual(res.rows[0].pid, seen.pid)
  assert.strictEqual((await eventually(seen.pid, 'app')).application_name, 'app')
}

async function testSkipNodeModulesAndOption (pool) {
  // a library under node_modules (skipped by default) called through a "data layer" (skipped via options.skip)
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'twc-'))
  fs.mkdirSync(path.join(dir, 'node_modules', 'fakeorm'), { recursive: true })
  fs.writeFileSync(path.join(dir, 'node_modules', 'fakeorm', 'index.js'), 'exports.get = (pool) => new Promise((resolve, reject) =>\n  pool.connect((err, client, done) => err ? reject(err) : resolve({ client, done })))\n')
  fs.writeFileSync(path.join(dir, 'dal_layer.js'), "const orm = require('./node_modules/fakeorm')\nexports.get = (pool) => orm.get(pool)\n")
  const dal = require(path.join(dir, 'dal_layer.js'))
  const skipping = wrap(new pg.Pool({ connectionString: URL, max: 1 }), 'app', { skip: ['dal_layer.js'] })
  try {
    let line = here() + 1
    let { client, done } = await require(path.join(dir, 'node_modules', 'fakeorm')).get(pool)
    try {
      assert.strictEqual((await appName(client.processID)).application_name, `app:${FILE}:${line}:testSkipNodeModulesAndOption`)
    } finally { done() }
    line = here() + 1;
    ({ client, done } = await dal.get(skipping))
    try {
      assert.strictEqual((await appName(client.processID)).application_name, `app:${FILE}:${line}:testSkipNodeModulesAndOption`)
    } finally { done() }
    assert.strictEqual((await eventually(client.processID, 'app')).application_name, 'app')
  } finally { await skipping.end() }
}

async function a_node_function_with_a_name_long_enough_to_overflow_sixty_three_bytes (pool) {
  const line = here() + 1
  const client = await pool.connect()
  return { client, line }
}

async function testTruncation (pool) {
  const { client, line } = await a_node_function_with_a_name_long_enough_to_overflow_sixty_three_bytes(pool)
  try {
    assert.strictEqual((await appName(client.processID)).application_name, `app:${FILE}:${line}`) // function dropped
  } finally { client.release() }
  const long = 'é'.repeat(40) // 80 bytes
  assert.strictEqual(fit(long), 'é'.repeat(31)) // 62 bytes, never half a character
  assert.strictEqual(Buffer.byteLength(callerName(long)), 62)
  assert.strictEqual(fit('abc'), 'abc')
}

async function main () {
  setTimeout(() => { console.log('FAIL node: timed out after 60 s'); process.exit(1) }, 60000).unref()
  observer = new pg.Client({ connectionString: URL })
  await observer.connect()
  const pool = wrap(new pg.Pool({ connectionString: URL, max: 2 }), 'app')
  let passed = 0; let failed = 0
  for (const t of [testConnectAndRelease, testPoolQuery, testSkipNodeModulesAndOption, testTruncation]) {
    try {
      await t(pool)
      passed++
      console.log(`PASS node:${t.name}`)
    } catch (err) {
      failed++
      console.log(`FAIL node:${t.name}: ${err.message}`)
    }
  }
  await Promise.race([Promise.all([pool.end(), observer.end()]), sleep(5000)])
  console.log(`${passed} passed, ${failed} failed`)
  process.exit(failed ? 1 : 0)
}

main().catch((err) => { console.error(err); process.exit(1) })
