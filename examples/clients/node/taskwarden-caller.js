'use strict'
/*
 * taskwarden-caller: name the caller of every node-postgres session in
 * PostgreSQL's application_name, so taskwarden (reading pg_stat_activity) can
 * say who opened a leaked "idle in transaction" session.
 *
 *   const pg = require('pg')
 *   const { wrap } = require('./taskwarden-caller')
 *   const pool = wrap(new pg.Pool({ connectionString }), 'myapp')
 *   const client = await pool.connect()   // application_name = myapp:orders.js:42:placeOrder
 *   client.release()                      // back to 'myapp' before it is pooled again
 *   await pool.query('SELECT 1')          // the same around a one-shot query
 *
 * The caller is the first stack frame outside node_modules, node internals and
 * this file (options.skip: extra path substrings to skip, e.g. your data
 * layer).  Format APP:FILE:LINE:FUNCTION, FILE the basename, cut to 63 bytes
 * (PostgreSQL's NAMEDATALEN-1) on a UTF-8 boundary: ':FUNCTION' goes first.
 * Cost: one `SET application_name` round trip per checkout and one per
 * release; a failed SET destroys that client and retries once with another.
 */
const path = require('path')
const { fileURLToPath } = require('url')

const MAX = 63

function fit (text, limit = MAX) {
  let out = ''
  let used = 0
  for (const ch of text) {
    const n = Buffer.byteLength(ch)
    if (used + n > limit) break
    out += ch
    used += n
  }
  return out
}

function callerSites () {
  const savedPrepare = Error.prepareStackTrace
  const savedLimit = Error.stackTraceLimit
  Error.prepareStackTrace = (_, sites) => sites
  Error.stackTraceLimit = 64
  const holder = {}
  Error.captureStackTrace(holder, callerSites)
  const sites = holder.stack
  Error.prepareStackTrace = savedPrepare
  Error.stackTraceLimit = savedLimit
  return sites
}

function callerName (app, skip = []) {
  for (const site of callerSites()) {
    let file = site.getFileName() || ''
    if (file.startsWith('file://')) file = fileURLToPath(file)
    if (!path.isAbsolute(file) || file === __filename) continue // node:internal/..., eval
    if (file.includes(`${path.sep}node_modules${path.sep}`)) continue
    if (skip.some((s) => file.includes(s))) continue
    const base = `${app}:${path.basename(file)}:${site.getLineNumber()}`
    const full = `${base}:${site.getFunctionName() || site.getMethodName() || '<anonymous>'}`
    return Buffer.byteLength(full) <= MAX ? full : fit(base)
  }
  return fit(app)
}

function setSql (name) {
  const text = name.replace(/\0/g, '')
  if (text.includes('\\')) return `SET application_name = E'${text.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`
  return `SET application_name = '${text.replace(/'/g, "''")}'`
}

function wrap (pool, app, options = {}) {
  const skip = options.skip || []
  const rawConnect = pool.connect.bind(pool)
  const resetSql = setSql(fit(app))

  async function acquire (name, retries = 1) {
    const client = await rawConnect()
    try {
      await client.query(setSql(name))
    } catch (err) {
      client.release(err) // destroys it
      if (retries > 0) return acquire(name, retries - 1)
      throw err
    }
    const release = client.release
    client.release = (err) => {
      client.release = release
      if (err) return release(err)
      client.query(resetSql).then(() => release(), (e) => release(e))
    }
    return client
  }

  pool.connect = function connect (cb) {
    const p = acquire(callerName(app, skip))
    if (typeof cb !== 'function') return p
    p.then((client) => cb(undefined, client, client.release), (err) => cb(err))
  }

  pool.query = function query (text, values, cb) {
    if (typeof values === 'function') {
      cb = values
      values = undefined
    }
    const p = acquire(callerName(app, skip)).then((client) =>
      client.query(text, values).then(
        (res) => { client.release(); return res },
        (err) => { client.release(err); throw err } // as pg-pool does
      ))
    if (typeof cb !== 'function') return p
    p.then((res) => cb(undefined, res), (err) => cb(err))
  }

  return pool
}

module.exports = { wrap, callerName, fit, setSql, MAX }
