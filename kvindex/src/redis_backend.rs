//! The index on a shared Redis, so that several scheduler replicas answer from one index.
//!
//! [`RedisIndex`] implements [`IndexBackend`] with exactly the semantics of the in-memory
//! [`Index`](crate::Index): tiers, reference counts per (engine, key, tier), orphans reported to
//! the caller, tokenless placeholder events resolved through the engine-hash alias, events of
//! KV-cache groups other than 0 ignored, `AllBlocksCleared` purging the engine, and queries that
//! return per engine the longest consecutive prefix held from block 0 on any tier. Block keys are
//! computed here, in Rust, exactly as the memory index computes them; Redis only stores them.
//!
//! # Data model
//!
//! Every key lives under the configured prefix `P` (below, `<k>` is a block key and `<a>` an
//! alias, both lower-case hex; `<id>` is an engine id in decimal):
//!
//! | key            | type   | content                                                           |
//! |----------------|--------|-------------------------------------------------------------------|
//! | `P:seq`        | string | engine id counter (`INCR`); ids are never reused                  |
//! | `P:engines`    | hash   | encoded [`EngineSpec`] → engine id                                |
//! | `P:specs`      | hash   | engine id → encoded spec (`<dp_rank>:<pod length>:<pod><model>`)  |
//! | `P:bs`         | hash   | engine id → tokens per block, learned from its first stored event |
//! | `P:gen`        | string | generation, incremented whenever `P:specs` or `P:bs` change       |
//! | `P:applied`    | hash   | engine id → sequence number of the last batch applied             |
//! | `P:a:<a>`      | string | engine block hash → block key (the alias)                         |
//! | `P:b:<k>`      | hash   | field `<id>:<tier>` → reference count (field deleted at 0)        |
//! | `P:e:<id>`     | set    | the block keys engine `<id>` holds on any tier (for clear/remove) |
//!
//! Tiers are digits (`0` gpu, `1` cpu, `2` storage, `3` remote, as [`Tier`]). An alias names the
//! engine hash after the memory index's `alias_key` mapping, so the two backends agree even on the
//! reserved hash values 0 and 1.
//!
//! Engine registration is one Lua script: two replicas registering the same spec get the same id.
//! Every write is a Lua script (atomic on the server) that first checks that the engine is still
//! registered, so a replica whose engine list is stale gets [`IndexError::UnknownEngine`] rather
//! than writing under a removed id.
//!
//! # Round trips
//!
//! * `apply`: per `BlockStored` event, one round trip to resolve the parent alias (skipped when the
//!   parent was stored earlier in the same batch) and one script that writes the aliases and the
//!   memberships; one script per `BlockRemoved` or placeholder event; `AllBlocksCleared` purges
//!   the engine's set in chunks of [`PURGE_CHUNK`] keys.
//! * `query`: one `MULTI`/`EXEC` reading the generation and the hashes of all the prompt's block
//!   keys (for [`QueryBlocks::Tokens`], the keys of every distinct block size of the candidate
//!   engines); [`QueryBlocks::VllmHashes`] takes one more round trip first, for the aliases. The
//!   engine list (names, models, block sizes) is cached in each replica and re-read when the
//!   generation read with the blocks differs from the cached one, so engines registered by another
//!   replica, or block sizes learned by it, are seen by the next query.
//!
//! # Memory
//!
//! The memory index's byte budget ([`IndexConfig::byte_budget`]) does not apply: the budget on
//! Redis is Redis's own `maxmemory`, with `maxmemory-policy allkeys-lru` (or `allkeys-lfu`). Block
//! hashes and aliases are read by every query and write, so the least recently used ones go
//! first, as in the memory index's eviction; an evicted block is forgotten for every engine, an
//! evicted alias makes later events naming it orphans or unresolved, exactly as after eviction in
//! memory. Aliases are not deleted when their block dies (the memory index keeps them until its
//! alias table is rebuilt): under memory pressure Redis evicts them, least recently used first.
//! The registry keys (`P:specs`, `P:bs`, `P:gen`) are read by every query or write, and an
//! engine's set is written with its blocks, which keeps them at the hot end of the LRU.
//!
//! Only the tier weights of the [`IndexConfig`] are used. Counters ([`RedisIndex::stats`]) are
//! this replica's; Redis holds no statistics. The backend targets a standalone Redis (or a
//! primary with replicas); Redis Cluster is not supported, since scripts compute key names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use redis::{Cmd, Connection, FromRedisValue, RedisError, RedisResult, Value};

use crate::backend::IndexBackend;
use crate::event::{BlockRemoved, BlockStored, EngineHash, EventBatch, KvEvent};
use crate::index::{
    alias_key, event_keys, ApplyReport, EngineId, EngineMatch, EngineSpec, IndexConfig, IndexStats,
    Query, QueryBlocks, Tier, TIERS,
};
use crate::key::{block_extras, BlockKey, KeyHasher};
use crate::{EngineName, IndexError, Result};

/// Block keys popped from an engine's set per purge round trip.
pub const PURGE_CHUNK: usize = 512;
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one reply.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Reads of a query before it settles for a generation that moved under it.
const QUERY_ATTEMPTS: usize = 3;
/// Error code the scripts reply with when the engine is not registered.
const UNKNOWN_ENGINE: &str = "KVMESH_UNKNOWN_ENGINE";

/// Shared by the scripts that write memberships: `ARGV[1]` is the prefix, `ARGV[2]` the engine.
const LUA_PRELUDE: &str = r#"
local p, e = ARGV[1], ARGV[2]
if redis.call('HEXISTS', p .. ':specs', e) == 0 then
  return redis.error_reply('KVMESH_UNKNOWN_ENGINE engine ' .. e)
end
local function learn_block_size(bs)
  if redis.call('HSETNX', p .. ':bs', e, bs) == 1 then redis.call('INCR', p .. ':gen') end
end
local function add(k, field, restore)
  local bk = p .. ':b:' .. k
  local fresh
  if restore then
    fresh = redis.call('HSETNX', bk, field, 1) == 1
  else
    fresh = redis.call('HINCRBY', bk, field, 1) == 1
  end
  if fresh then redis.call('SADD', p .. ':e:' .. e, k) end
end
"#;

/// `ARGV`: prefix, encoded spec. Returns the engine's id, allocating one if the spec is new.
const LUA_REGISTER: &str = r#"
local p, enc = ARGV[1], ARGV[2]
local id = redis.call('HGET', p .. ':engines', enc)
if id then return tonumber(id) end
id = redis.call('INCR', p .. ':seq') - 1
redis.call('HSET', p .. ':engines', enc, id)
redis.call('HSET', p .. ':specs', id, enc)
redis.call('INCR', p .. ':gen')
return id
"#;

/// `ARGV`: prefix, engine. Unregisters the engine; returns 0 if it was not registered.
const LUA_UNREGISTER: &str = r#"
local p, e = ARGV[1], ARGV[2]
local enc = redis.call('HGET', p .. ':specs', e)
if not enc then return 0 end
redis.call('HDEL', p .. ':engines', enc)
redis.call('HDEL', p .. ':specs', e)
redis.call('HDEL', p .. ':bs', e)
redis.call('INCR', p .. ':gen')
return 1
"#;

/// `ARGV`: prefix, engine, block size, parent alias. Learns the block size; returns the key the
/// parent's alias names, or nil.
const LUA_RESOLVE: &str = r#"
learn_block_size(ARGV[3])
return redis.call('GET', p .. ':a:' .. ARGV[4])
"#;

/// `ARGV`: prefix, engine, tier, restore (0/1), block size, then (alias, key) pairs. Writes the
/// aliases (keeping an alias whose block is still held by someone) and the memberships. Returns
/// the number of alias conflicts, then per block the key its alias names afterwards.
const LUA_STORE: &str = r#"
learn_block_size(ARGV[5])
local field = e .. ':' .. ARGV[3]
local restore = ARGV[4] == '1'
local conflicts = 0
local out = {''}
for i = 6, #ARGV, 2 do
  local ak, k = p .. ':a:' .. ARGV[i], ARGV[i + 1]
  local old = redis.call('GET', ak)
  local final = k
  if not old then
    redis.call('SET', ak, k)
  elseif old ~= k then
    if redis.call('EXISTS', p .. ':b:' .. old) == 1 then
      conflicts = conflicts + 1
      final = old
    else
      redis.call('SET', ak, k)
    end
  end
  out[#out + 1] = final
  add(k, field, restore)
end
out[1] = tostring(conflicts)
return out
"#;

/// `ARGV`: prefix, engine, tier, restore (0/1), then aliases. Adds the tier to every block whose
/// alias is known; returns per alias 1 (applied) or 0 (unresolved).
const LUA_PLACEHOLDER: &str = r#"
local field = e .. ':' .. ARGV[3]
local restore = ARGV[4] == '1'
local out = {}
for i = 5, #ARGV do
  local k = redis.call('GET', p .. ':a:' .. ARGV[i])
  if k then
    add(k, field, restore)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

/// `ARGV`: prefix, engine, tier, then aliases. Drops one announcement of each block on the tier;
/// returns how many were held.
const LUA_REMOVE: &str = r#"
local field = e .. ':' .. ARGV[3]
local removed = 0
for i = 4, #ARGV do
  local k = redis.call('GET', p .. ':a:' .. ARGV[i])
  if k then
    local bk = p .. ':b:' .. k
    local c = tonumber(redis.call('HGET', bk, field) or '0')
    if c > 1 then
      redis.call('HINCRBY', bk, field, -1)
      removed = removed + 1
    elseif c == 1 then
      redis.call('HDEL', bk, field)
      removed = removed + 1
      if redis.call('HEXISTS', bk, e .. ':0') == 0 and redis.call('HEXISTS', bk, e .. ':1') == 0
        and redis.call('HEXISTS', bk, e .. ':2') == 0 and redis.call('HEXISTS', bk, e .. ':3') == 0
      then
        redis.call('SREM', p .. ':e:' .. e, k)
      end
    end
  end
end
return removed
"#;

/// `ARGV`: prefix, engine, count, check (0/1). Pops up to `count` keys of the engine's set and
/// drops its memberships of them; returns how many keys are left.
const LUA_PURGE: &str = r#"
local p, e = ARGV[1], ARGV[2]
if ARGV[4] == '1' and redis.call('HEXISTS', p .. ':specs', e) == 0 then
  return redis.error_reply('KVMESH_UNKNOWN_ENGINE engine ' .. e)
end
local set = p .. ':e:' .. e
local ks = redis.call('SPOP', set, tonumber(ARGV[3]))
for _, k in ipairs(ks) do
  redis.call('HDEL', p .. ':b:' .. k, e .. ':0', e .. ':1', e .. ':2', e .. ':3')
end
return redis.call('SCARD', set)
"#;

/// A Lua script and its SHA1 as the server computed it.
struct Script {
    body: String,
    sha: String,
}

/// Every script the backend runs.
struct Scripts {
    register: Script,
    unregister: Script,
    resolve: Script,
    store: Script,
    placeholder: Script,
    remove: Script,
    purge: Script,
}

impl Scripts {
    /// Loads every script into the server's script cache.
    fn load(conn: &mut Connection) -> RedisResult<Scripts> {
        let mut load = |body: String| -> RedisResult<Script> {
            let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(&body).query(conn)?;
            Ok(Script { body, sha })
        };
        let with_prelude = |s: &str| format!("{LUA_PRELUDE}{s}");
        Ok(Scripts {
            register: load(LUA_REGISTER.to_owned())?,
            unregister: load(LUA_UNREGISTER.to_owned())?,
            resolve: load(with_prelude(LUA_RESOLVE))?,
            store: load(with_prelude(LUA_STORE))?,
            placeholder: load(with_prelude(LUA_PLACEHOLDER))?,
            remove: load(with_prelude(LUA_REMOVE))?,
            purge: load(LUA_PURGE.to_owned())?,
        })
    }
}

/// Runs a script by SHA, sending its body once if the server's script cache lost it (restart,
/// `SCRIPT FLUSH`). `args` appends the script's `ARGV`.
fn eval<T: FromRedisValue>(
    conn: &mut Connection,
    script: &Script,
    args: impl Fn(&mut Cmd),
) -> RedisResult<T> {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(&script.sha).arg(0);
    args(&mut cmd);
    match cmd.query(conn) {
        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(&script.body).arg(0);
            args(&mut cmd);
            cmd.query(conn)
        }
        r => r,
    }
}

/// An engine as the registry in Redis describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisEngine {
    /// The engine's id, shared by every replica.
    pub id: EngineId,
    /// The engine's identity.
    pub spec: EngineSpec,
    /// Display name (see [`EngineSpec::name`]).
    pub name: EngineName,
    /// Tokens per block, once learned from the engine's events.
    pub block_size: Option<u32>,
}

/// This replica's copy of the engine registry.
#[derive(Default)]
struct EngineCache {
    /// The value of `P:gen` this copy was read at.
    gen: i64,
    /// Engines, by id.
    list: Vec<RedisEngine>,
    /// Engine id to position in `list`.
    by_id: HashMap<u32, usize>,
}

impl EngineCache {
    fn get(&self, id: EngineId) -> Option<&RedisEngine> {
        self.by_id.get(&id.0).map(|&i| &self.list[i])
    }
}

/// Counters of this replica.
#[derive(Default)]
struct Counters {
    events: AtomicU64,
    blocks_stored: AtomicU64,
    blocks_removed: AtomicU64,
    unknown_removals: AtomicU64,
    orphans: AtomicU64,
    orphans_recovered: AtomicU64,
    orphans_unrecovered: AtomicU64,
    unresolved_tier_events: AtomicU64,
    other_group_events: AtomicU64,
    malformed_events: AtomicU64,
    alias_conflicts: AtomicU64,
    queries: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The writer's connection and scratch, under the writer lock.
struct WriterState {
    conn: Option<Connection>,
    hasher: KeyHasher,
    keys: Vec<BlockKey>,
}

/// Fixed key names under the prefix.
struct Names {
    prefix: String,
    engines: String,
    specs: String,
    bs: String,
    gen: String,
    applied: String,
}

impl Names {
    fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_owned(),
            engines: format!("{prefix}:engines"),
            specs: format!("{prefix}:specs"),
            bs: format!("{prefix}:bs"),
            gen: format!("{prefix}:gen"),
            applied: format!("{prefix}:applied"),
        }
    }

    fn block(&self, key: u64) -> String {
        format!("{}:b:{key:x}", self.prefix)
    }

    fn alias(&self, h: EngineHash) -> String {
        format!("{}:a:{:x}", self.prefix, alias_key(h))
    }
}

/// The hex form of an engine hash as alias keys name it (without the prefix).
fn alias_arg(h: EngineHash) -> String {
    format!("{:x}", alias_key(h))
}

/// The Redis form of a spec: `<dp_rank>:<pod length in bytes>:<pod><model>`.
fn encode_spec(s: &EngineSpec) -> String {
    format!("{}:{}:{}{}", s.dp_rank, s.pod.len(), s.pod, s.model)
}

/// The inverse of [`encode_spec`].
fn decode_spec(s: &str) -> Option<EngineSpec> {
    let (dp, rest) = s.split_once(':')?;
    let (len, rest) = rest.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if !rest.is_char_boundary(len) {
        return None;
    }
    let (pod, model) = rest.split_at(len);
    Some(EngineSpec {
        pod: pod.to_owned(),
        dp_rank: dp.parse().ok()?,
        model: model.to_owned(),
    })
}

/// Whether an error leaves the connection unusable.
fn is_fatal(e: &RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error()
}

/// Maps a Redis error, recognising the scripts' unknown-engine reply.
fn map_err(e: RedisError, id: Option<EngineId>) -> IndexError {
    match id {
        Some(id) if e.code() == Some(UNKNOWN_ENGINE) => {
            IndexError::UnknownEngine(format!("#{}", id.0))
        }
        _ => IndexError::Redis(e.to_string()),
    }
}

/// The error for an engine this backend does not know.
fn unknown(id: EngineId) -> IndexError {
    IndexError::UnknownEngine(format!("#{}", id.0))
}

/// One block as a query reads it: (engine id, tier) of every membership.
type Holders = Vec<(u32, u8)>;

/// Per-query scratch, by position in the engine cache.
struct Walk {
    matched: Vec<u32>,
    tiers: Vec<[u32; TIERS]>,
    /// Per engine and tier: matched blocks whose best tier that is.
    best: Vec<[u32; TIERS]>,
    allowed: Vec<bool>,
}

/// A chain of block keys to walk, and the engines (by cache position) allowed to advance on it.
struct Chain {
    keys: Vec<u64>,
    allowed: Vec<bool>,
}

/// The index on a shared Redis. `Send + Sync`; one writer connection and one reader connection,
/// so that queries do not wait behind ingestion.
pub struct RedisIndex {
    client: redis::Client,
    names: Names,
    weights: [f64; TIERS],
    scripts: Scripts,
    writer: Mutex<WriterState>,
    reader: Mutex<Option<Connection>>,
    engines: RwLock<Arc<EngineCache>>,
    counters: Counters,
}

impl RedisIndex {
    /// Connects to the Redis at `url` (`redis://[user:password@]host[:port][/db]`), keeping every
    /// key under `prefix`. Replicas that should share an index use the same URL and prefix. Only
    /// `config.tier_weights` is used; the byte budget is the server's `maxmemory` (see the module
    /// documentation).
    pub fn connect(url: &str, prefix: &str, config: IndexConfig) -> Result<RedisIndex> {
        if prefix.is_empty() {
            return Err(IndexError::InvalidArgument("empty redis key prefix".into()));
        }
        let client = redis::Client::open(url).map_err(|e| map_err(e, None))?;
        let mut conn = Self::open(&client).map_err(|e| map_err(e, None))?;
        let scripts = Scripts::load(&mut conn).map_err(|e| map_err(e, None))?;
        let reader = Self::open(&client).map_err(|e| map_err(e, None))?;
        let index = RedisIndex {
            client,
            names: Names::new(prefix),
            weights: config.tier_weights,
            scripts,
            writer: Mutex::new(WriterState {
                conn: Some(conn),
                hasher: KeyHasher::new(),
                keys: Vec::new(),
            }),
            reader: Mutex::new(Some(reader)),
            engines: RwLock::new(Arc::new(EngineCache::default())),
            counters: Counters::default(),
        };
        index.refresh_engines()?;
        Ok(index)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.names.prefix
    }

    /// Every registered engine, read from Redis now (this also refreshes the replica's cache).
    pub fn engines(&self) -> Result<Vec<RedisEngine>> {
        Ok(self.refresh_engines()?.list.clone())
    }

    /// Looks an engine up by its spec.
    pub fn engine_id(&self, spec: &EngineSpec) -> Result<Option<EngineId>> {
        let mut slot = self.reader.lock();
        let id: Option<u32> = self
            .call(&mut slot, |c| {
                redis::cmd("HGET")
                    .arg(&self.names.engines)
                    .arg(encode_spec(spec))
                    .query(c)
            })
            .map_err(|e| map_err(e, None))?;
        Ok(id.map(EngineId))
    }

    /// Counters of this replica, with `engines` read from Redis, `bytes` the server's
    /// `used_memory` and `byte_budget` its `maxmemory` (0: unlimited). Block, membership, slot and
    /// alias counts are not tracked on Redis and read 0.
    pub fn stats(&self) -> Result<IndexStats> {
        let mut slot = self.reader.lock();
        let (engines, info): (usize, String) = self
            .call(&mut slot, |c| {
                redis::pipe()
                    .cmd("HLEN")
                    .arg(&self.names.specs)
                    .cmd("INFO")
                    .arg("memory")
                    .query(c)
            })
            .map_err(|e| map_err(e, None))?;
        let info_field = |name: &str| -> usize {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(IndexStats {
            engines,
            bytes: info_field("used_memory"),
            byte_budget: info_field("maxmemory"),
            events: get(&c.events),
            blocks_stored: get(&c.blocks_stored),
            blocks_removed: get(&c.blocks_removed),
            unknown_removals: get(&c.unknown_removals),
            orphans: get(&c.orphans),
            orphans_recovered: get(&c.orphans_recovered),
            orphans_unrecovered: get(&c.orphans_unrecovered),
            unresolved_tier_events: get(&c.unresolved_tier_events),
            other_group_events: get(&c.other_group_events),
            malformed_events: get(&c.malformed_events),
            alias_conflicts: get(&c.alias_conflicts),
            queries: get(&c.queries),
            ..IndexStats::default()
        })
    }

    /// Opens one connection with the backend's timeouts.
    fn open(client: &redis::Client) -> RedisResult<Connection> {
        let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(conn)
    }

    /// Runs `f` on the connection in `slot`, reconnecting first if an earlier failure dropped
    /// it; a failure that leaves the connection unusable drops it.
    fn call<T>(
        &self,
        slot: &mut Option<Connection>,
        f: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let conn = match slot {
            Some(c) => c,
            None => slot.insert(Self::open(&self.client)?),
        };
        let r = f(conn);
        if let Err(e) = &r {
            if is_fatal(e) {
                *slot = None;
            }
        }
        r
    }

    /// The cached engine registry.
    fn cache(&self) -> Arc<EngineCache> {
        self.engines.read().clone()
    }

    /// Re-reads the engine registry on the reader connection.
    fn refresh_engines(&self) -> Result<Arc<EngineCache>> {
        let mut slot = self.reader.lock();
        self.call(&mut slot, |c| self.refresh_on(c))
            .map_err(|e| map_err(e, None))
    }

    /// Re-reads the engine registry (one `MULTI`/`EXEC`) and installs it.
    fn refresh_on(&self, conn: &mut Connection) -> RedisResult<Arc<EngineCache>> {
        let (gen, specs, sizes): (Option<i64>, HashMap<String, String>, HashMap<String, u32>) =
            redis::pipe()
                .atomic()
                .cmd("GET")
                .arg(&self.names.gen)
                .cmd("HGETALL")
                .arg(&self.names.specs)
                .cmd("HGETALL")
                .arg(&self.names.bs)
                .query(conn)?;
        let mut list: Vec<RedisEngine> = specs
            .iter()
            .filter_map(|(id, enc)| {
                let spec = decode_spec(enc)?;
                Some(RedisEngine {
                    id: EngineId(id.parse().ok()?),
                    name: spec.name().into(),
                    block_size: sizes.get(id).copied().filter(|&b| b > 0),
                    spec,
                })
            })
            .collect();
        list.sort_by_key(|e| e.id);
        let by_id = list.iter().enumerate().map(|(i, e)| (e.id.0, i)).collect();
        let cache = Arc::new(EngineCache {
            gen: gen.unwrap_or(0),
            list,
            by_id,
        });
        // Two concurrent refreshes may install out of order; the older copy then fails the next
        // query's generation check and is read again.
        *self.engines.write() = cache.clone();
        Ok(cache)
    }

    /// The cached description of an engine, re-reading the registry once if it is not cached.
    fn engine(&self, id: EngineId) -> Result<RedisEngine> {
        if let Some(e) = self.cache().get(id) {
            return Ok(e.clone());
        }
        self.refresh_engines()?
            .get(id)
            .cloned()
            .ok_or_else(|| unknown(id))
    }

    /// Drops every membership of engine `id`, chunk by chunk. With `check`, fails if the engine
    /// is not registered.
    fn purge(&self, w: &mut WriterState, id: EngineId, mut check: bool) -> Result<()> {
        loop {
            let left: u64 = self
                .call(&mut w.conn, |c| {
                    eval(c, &self.scripts.purge, |cmd| {
                        cmd.arg(&self.names.prefix)
                            .arg(id.0)
                            .arg(PURGE_CHUNK)
                            .arg(if check { "1" } else { "0" });
                    })
                })
                .map_err(|e| map_err(e, Some(id)))?;
            check = false;
            if left == 0 {
                return Ok(());
            }
        }
    }

    /// Applies one `BlockStored`. `aliases` holds the aliases written earlier in the same batch.
    #[allow(clippy::too_many_arguments)]
    fn apply_stored(
        &self,
        w: &mut WriterState,
        engine: &RedisEngine,
        ev: &BlockStored,
        restore: bool,
        count_orphans: bool,
        aliases: &mut HashMap<EngineHash, u64>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let c = &self.counters;
        if ev.group_idx.unwrap_or(0) != 0 {
            bump(&c.other_group_events, 1);
            return Ok(());
        }
        let id = engine.id;
        let tier = Tier::of(ev.medium.as_ref(), ev.locality.as_deref()) as u8;
        let restore_arg = if restore { "1" } else { "0" };
        if ev.token_ids.is_empty() || ev.block_size == 0 {
            // A placeholder tier event: the blocks are named only by the engine's hashes.
            if ev.block_hashes.is_empty() {
                return Ok(());
            }
            let applied: Vec<i64> = self
                .call(&mut w.conn, |conn| {
                    eval(conn, &self.scripts.placeholder, |cmd| {
                        cmd.arg(&self.names.prefix)
                            .arg(id.0)
                            .arg(tier)
                            .arg(restore_arg);
                        for &h in &ev.block_hashes {
                            cmd.arg(alias_arg(h));
                        }
                    })
                })
                .map_err(|e| map_err(e, Some(id)))?;
            for (&h, &ok) in ev.block_hashes.iter().zip(&applied) {
                if ok == 1 {
                    report.blocks_stored += 1;
                    bump(&c.blocks_stored, 1);
                } else {
                    report.unresolved.push(h);
                    bump(&c.unresolved_tier_events, 1);
                }
            }
            return Ok(());
        }
        let n = ev.block_hashes.len();
        if ev.token_ids.len() != n * ev.block_size as usize {
            bump(&c.malformed_events, 1);
            return Ok(());
        }
        let parent = match ev.parent_block_hash {
            None => None,
            Some(p) => match aliases.get(&p) {
                Some(&k) => Some(k),
                None => {
                    let found: Option<String> = self
                        .call(&mut w.conn, |conn| {
                            eval(conn, &self.scripts.resolve, |cmd| {
                                cmd.arg(&self.names.prefix)
                                    .arg(id.0)
                                    .arg(ev.block_size)
                                    .arg(alias_arg(p));
                            })
                        })
                        .map_err(|e| map_err(e, Some(id)))?;
                    match found.and_then(|s| u64::from_str_radix(&s, 16).ok()) {
                        Some(k) => {
                            aliases.insert(p, k);
                            Some(k)
                        }
                        None => {
                            if count_orphans {
                                bump(&c.orphans, 1);
                            }
                            report.orphans.push(ev.clone());
                            return Ok(());
                        }
                    }
                }
            },
        };
        let WriterState { conn, hasher, keys } = w;
        event_keys(hasher, &engine.spec.model, ev, parent, keys);
        let out: Vec<String> = self
            .call(conn, |conn| {
                eval(conn, &self.scripts.store, |cmd| {
                    cmd.arg(&self.names.prefix)
                        .arg(id.0)
                        .arg(tier)
                        .arg(restore_arg)
                        .arg(ev.block_size);
                    for (&h, k) in ev.block_hashes.iter().zip(keys.iter()) {
                        cmd.arg(alias_arg(h)).arg(format!("{:x}", k.0));
                    }
                })
            })
            .map_err(|e| map_err(e, Some(id)))?;
        let conflicts = out.first().and_then(|s| s.parse().ok()).unwrap_or(0);
        bump(&c.alias_conflicts, conflicts);
        for (&h, k) in ev.block_hashes.iter().zip(out.iter().skip(1)) {
            if let Ok(k) = u64::from_str_radix(k, 16) {
                aliases.insert(h, k);
            }
        }
        report.blocks_stored += n;
        bump(&c.blocks_stored, n as u64);
        Ok(())
    }

    /// Applies one `BlockRemoved`.
    fn apply_removed(
        &self,
        w: &mut WriterState,
        id: EngineId,
        ev: &BlockRemoved,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let c = &self.counters;
        if ev.group_idx.unwrap_or(0) != 0 {
            bump(&c.other_group_events, 1);
            return Ok(());
        }
        if ev.block_hashes.is_empty() {
            return Ok(());
        }
        let tier = Tier::of(ev.medium.as_ref(), ev.locality.as_deref()) as u8;
        let removed: usize = self
            .call(&mut w.conn, |conn| {
                eval(conn, &self.scripts.remove, |cmd| {
                    cmd.arg(&self.names.prefix).arg(id.0).arg(tier);
                    for &h in &ev.block_hashes {
                        cmd.arg(alias_arg(h));
                    }
                })
            })
            .map_err(|e| map_err(e, Some(id)))?;
        report.blocks_removed += removed;
        bump(&c.blocks_removed, removed as u64);
        bump(
            &c.unknown_removals,
            ev.block_hashes.len().saturating_sub(removed) as u64,
        );
        Ok(())
    }

    /// Answers a query on one connection: reads the blocks with the generation, and re-reads the
    /// engine registry (then the blocks again) if the generation moved.
    fn query_on(&self, conn: &mut Connection, q: &Query<'_>) -> RedisResult<Vec<EngineMatch>> {
        // vLLM hashes are resolved once, up to the first unknown one (where any walk stops).
        let resolved: Option<Vec<u64>> = match q.blocks {
            QueryBlocks::VllmHashes(hashes) if !hashes.is_empty() => {
                let names: Vec<String> = hashes.iter().map(|&h| self.names.alias(h)).collect();
                let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&names).query(conn)?;
                Some(
                    vals.iter()
                        .map_while(|v| v.as_deref().and_then(|s| u64::from_str_radix(s, 16).ok()))
                        .collect(),
                )
            }
            QueryBlocks::VllmHashes(_) => Some(Vec::new()),
            _ => None,
        };
        let mut cache = self.cache();
        let mut attempt = 1;
        let (chains, vals) = loop {
            let chains = self.plan(q, &cache, resolved.as_deref());
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("GET").arg(&self.names.gen);
            for &k in chains.iter().flat_map(|c| &c.keys) {
                pipe.cmd("HGETALL").arg(self.names.block(k));
            }
            let mut vals = pipe.query::<Vec<Value>>(conn)?.into_iter();
            let gen: Option<i64> =
                redis::from_owned_redis_value(vals.next().unwrap_or(Value::Nil))?;
            if gen.unwrap_or(0) == cache.gen || attempt == QUERY_ATTEMPTS {
                break (chains, vals);
            }
            // The registry changed (an engine came or went, or a block size was learned):
            // re-read it, and the blocks, which may be other keys now.
            attempt += 1;
            cache = self.refresh_on(conn)?;
        };
        let n = cache.list.len();
        let mut walk = Walk {
            matched: vec![0; n],
            tiers: vec![[0; TIERS]; n],
            best: vec![[0; TIERS]; n],
            allowed: Vec::new(),
        };
        let mut vals = vals;
        for chain in chains {
            let mut blocks: Vec<Holders> = Vec::with_capacity(chain.keys.len());
            for v in vals.by_ref().take(chain.keys.len()) {
                let fields: HashMap<String, i64> = redis::from_owned_redis_value(v)?;
                blocks.push(parse_holders(&fields));
            }
            walk.allowed = chain.allowed;
            self.walk_chain(&mut walk, &cache, &blocks);
        }
        Ok(results(&cache, &walk, &self.weights))
    }

    /// The chains of keys a query walks, with the engines allowed on each.
    fn plan(&self, q: &Query<'_>, cache: &EngineCache, resolved: Option<&[u64]>) -> Vec<Chain> {
        let allowed = |e: &RedisEngine| match q.engines {
            None => true,
            Some(list) => list.contains(&e.id),
        };
        match q.blocks {
            QueryBlocks::Tokens { tokens, mm } => {
                // One chain per distinct block size among the candidate engines of this model.
                let candidate = |e: &RedisEngine| e.spec.model == q.namespace.model && allowed(e);
                let mut sizes: Vec<u32> = Vec::new();
                for e in cache.list.iter().filter(|e| candidate(e)) {
                    if let Some(bs) = e.block_size {
                        if !sizes.contains(&bs) {
                            sizes.push(bs);
                        }
                    }
                }
                let mut hasher = KeyHasher::new();
                sizes
                    .into_iter()
                    .map(|bs| {
                        let bsz = bs as usize;
                        let mut prev = q.namespace.root_seed();
                        let keys = tokens
                            .chunks_exact(bsz)
                            .enumerate()
                            .map(|(i, toks)| {
                                let k = if mm.is_empty() {
                                    hasher.next(prev, toks)
                                } else {
                                    hasher.next_with(prev, toks, &block_extras(mm, i, bsz))
                                };
                                prev = k.0;
                                k.0
                            })
                            .collect();
                        let allowed = cache
                            .list
                            .iter()
                            .map(|e| candidate(e) && e.block_size == Some(bs))
                            .collect();
                        Chain { keys, allowed }
                    })
                    .collect()
            }
            QueryBlocks::Keys(keys) => vec![Chain {
                keys: keys.iter().map(|k| k.0).collect(),
                allowed: cache.list.iter().map(allowed).collect(),
            }],
            QueryBlocks::VllmHashes(_) => vec![Chain {
                keys: resolved.unwrap_or_default().to_vec(),
                allowed: cache.list.iter().map(allowed).collect(),
            }],
        }
    }

    /// Advances every allowed engine holding each block consecutively from block 0; stops when
    /// none advances (the memory index's walk, on blocks read from Redis).
    fn walk_chain(&self, walk: &mut Walk, cache: &EngineCache, blocks: &[Holders]) {
        let mut nibs: Vec<(usize, u8)> = Vec::new();
        for (depth, holders) in blocks.iter().enumerate() {
            nibs.clear();
            for &(id, tier) in holders {
                let Some(&e) = cache.by_id.get(&id) else {
                    continue;
                };
                match nibs.iter_mut().find(|n| n.0 == e) {
                    Some(n) => n.1 |= 1 << tier,
                    None => nibs.push((e, 1 << tier)),
                }
            }
            let mut advanced = false;
            for &(e, nib) in &nibs {
                if walk.allowed[e] && walk.matched[e] == depth as u32 {
                    walk.matched[e] += 1;
                    // The block counts for its best tier; the score is the sum over tiers of
                    // weight times those counts (the memory index's formula, float for float).
                    let mut top: Option<usize> = None;
                    for t in 0..TIERS {
                        if nib & (1 << t) != 0 {
                            walk.tiers[e][t] += 1;
                            if top.is_none_or(|b| self.weights[t] > self.weights[b]) {
                                top = Some(t);
                            }
                        }
                    }
                    if let Some(t) = top {
                        walk.best[e][t] += 1;
                    }
                    advanced = true;
                }
            }
            if !advanced {
                return;
            }
        }
    }
}

/// The memberships of one block hash (`<engine id>:<tier>` → count).
fn parse_holders(fields: &HashMap<String, i64>) -> Holders {
    fields
        .iter()
        .filter(|(_, &n)| n > 0)
        .filter_map(|(f, _)| {
            let (id, tier) = f.split_once(':')?;
            let tier: u8 = tier.parse().ok()?;
            (usize::from(tier) < TIERS).then_some((id.parse().ok()?, tier))
        })
        .collect()
}

/// The engines with at least one matched block, best score first, then by name.
fn results(cache: &EngineCache, walk: &Walk, weights: &[f64; TIERS]) -> Vec<EngineMatch> {
    let mut out: Vec<EngineMatch> = cache
        .list
        .iter()
        .enumerate()
        .filter(|&(i, _)| walk.matched[i] > 0)
        .map(|(i, e)| EngineMatch {
            engine: e.id,
            name: e.name,
            matched_blocks: walk.matched[i],
            matched_tokens: walk.matched[i] * e.block_size.unwrap_or(0),
            tiers: walk.tiers[i],
            score: weights
                .iter()
                .zip(walk.best[i])
                .map(|(w, c)| w * f64::from(c))
                .sum(),
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.name.cmp(&b.name))
    });
    out
}

impl IndexBackend for RedisIndex {
    fn add_engine(&self, spec: EngineSpec) -> Result<EngineId> {
        let mut w = self.writer.lock();
        let enc = encode_spec(&spec);
        let id: u32 = self
            .call(&mut w.conn, |c| {
                eval(c, &self.scripts.register, |cmd| {
                    cmd.arg(&self.names.prefix).arg(&enc);
                })
            })
            .map_err(|e| map_err(e, None))?;
        drop(w);
        if self.cache().get(EngineId(id)).is_none() {
            self.refresh_engines()?;
        }
        Ok(EngineId(id))
    }

    fn remove_engine(&self, id: EngineId) -> Result<()> {
        let mut w = self.writer.lock();
        // Unregister first, so that queries stop reporting the engine while it is purged.
        let removed: i64 = self
            .call(&mut w.conn, |c| {
                eval(c, &self.scripts.unregister, |cmd| {
                    cmd.arg(&self.names.prefix).arg(id.0);
                })
            })
            .map_err(|e| map_err(e, None))?;
        if removed == 0 {
            return Err(unknown(id));
        }
        self.purge(&mut w, id, false)?;
        self.call(&mut w.conn, |c| {
            redis::cmd("HDEL")
                .arg(&self.names.applied)
                .arg(id.0)
                .query::<i64>(c)
        })
        .map_err(|e| map_err(e, None))?;
        drop(w);
        self.refresh_engines()?;
        Ok(())
    }

    /// Applies the batch, then records its sequence number on the server, so that an ingester
    /// that restarts (this replica or another) resumes the engine's stream after it.
    fn apply_at(&self, id: EngineId, seq: u64, batch: &EventBatch) -> Result<ApplyReport> {
        let report = self.apply(id, batch)?;
        let mut w = self.writer.lock();
        self.call(&mut w.conn, |c| {
            redis::cmd("HSET")
                .arg(&self.names.applied)
                .arg(id.0)
                .arg(seq)
                .query::<i64>(c)
        })
        .map_err(|e| map_err(e, Some(id)))?;
        Ok(report)
    }

    fn applied_seq(&self, id: EngineId) -> Option<u64> {
        let mut w = self.writer.lock();
        self.call(&mut w.conn, |c| {
            redis::cmd("HGET")
                .arg(&self.names.applied)
                .arg(id.0)
                .query::<Option<u64>>(c)
        })
        .ok()
        .flatten()
    }

    fn clear_engine(&self, id: EngineId) -> Result<()> {
        let mut w = self.writer.lock();
        self.purge(&mut w, id, true)
    }

    fn apply(&self, id: EngineId, batch: &EventBatch) -> Result<ApplyReport> {
        let engine = self.engine(id)?;
        let mut w = self.writer.lock();
        let mut report = ApplyReport::default();
        let mut aliases = HashMap::new();
        for ev in &batch.events {
            bump(&self.counters.events, 1);
            match ev {
                KvEvent::BlockStored(s) => {
                    self.apply_stored(&mut w, &engine, s, false, true, &mut aliases, &mut report)?
                }
                KvEvent::BlockRemoved(r) => self.apply_removed(&mut w, id, r, &mut report)?,
                KvEvent::AllBlocksCleared => {
                    self.purge(&mut w, id, true)?;
                    report.cleared = true;
                }
            }
        }
        Ok(report)
    }

    fn apply_stored_with_ancestry(
        &self,
        id: EngineId,
        ancestors: &[BlockStored],
        orphan: &BlockStored,
    ) -> Result<bool> {
        let engine = self.engine(id)?;
        let mut w = self.writer.lock();
        let mut report = ApplyReport::default();
        let mut aliases = HashMap::new();
        for a in ancestors {
            self.apply_stored(&mut w, &engine, a, true, false, &mut aliases, &mut report)?;
            if !report.orphans.is_empty() {
                return Ok(false);
            }
        }
        self.apply_stored(
            &mut w,
            &engine,
            orphan,
            false,
            false,
            &mut aliases,
            &mut report,
        )?;
        let ok = report.orphans.is_empty();
        if ok {
            bump(&self.counters.orphans_recovered, 1);
        }
        Ok(ok)
    }

    fn note_unrecovered(&self, n: u64) {
        bump(&self.counters.orphans_unrecovered, n);
    }

    fn query(&self, q: &Query<'_>) -> Result<Vec<EngineMatch>> {
        bump(&self.counters.queries, 1);
        let mut slot = self.reader.lock();
        // A query only reads, so one retry on a fresh connection is safe.
        match self.call(&mut slot, |c| self.query_on(c, q)) {
            Err(e) if is_fatal(&e) => self.call(&mut slot, |c| self.query_on(c, q)),
            r => r,
        }
        .map_err(|e| map_err(e, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Medium;
    use crate::key::Namespace;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// A throw-away `redis-server` on a free loopback port, killed on drop.
    struct RedisServer {
        child: Child,
        dir: PathBuf,
        port: u16,
    }

    impl RedisServer {
        fn start() -> RedisServer {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("no free loopback port")
                .port();
            let dir = std::env::temp_dir().join(format!(
                "kvindex-redis-unit-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("cannot create redis temp dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start redis-server ({e}): install it (apt-get install redis-server)")
                });
            let server = RedisServer { child, dir, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !server.ping() {
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not answer on port {port}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            server
        }

        fn ping(&self) -> bool {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
                return false;
            };
            let mut buf = [0u8; 7];
            s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn spec(pod: &str) -> EngineSpec {
        EngineSpec {
            pod: pod.into(),
            dp_rank: 0,
            model: "m".into(),
        }
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
        KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().map(|&h| EngineHash(h)).collect(),
            parent_block_hash: parent.map(EngineHash),
            token_ids: tokens,
            block_size: bs,
            medium: Some(Medium::Gpu),
            ..Default::default()
        })
    }

    fn removed(h: u64) -> KvEvent {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineHash(h)],
            medium: Some(Medium::Gpu),
            ..Default::default()
        })
    }

    fn batch(events: Vec<KvEvent>) -> EventBatch {
        EventBatch {
            ts: 0.0,
            events,
            data_parallel_rank: Some(0),
        }
    }

    fn query(idx: &RedisIndex, tokens: &[u32]) -> Vec<EngineMatch> {
        let ns = Namespace::model("m");
        idx.query(&Query {
            namespace: &ns,
            blocks: QueryBlocks::Tokens { tokens, mm: &[] },
            engines: None,
        })
        .expect("query")
    }

    fn connect(srv: &RedisServer, prefix: &str) -> RedisIndex {
        RedisIndex::connect(&srv.url(), prefix, IndexConfig::default()).expect("connect")
    }

    fn redis_conn(srv: &RedisServer) -> Connection {
        redis::Client::open(srv.url())
            .and_then(|c| c.get_connection())
            .expect("redis connection")
    }

    #[test]
    fn spec_encoding_round_trips() {
        for s in [
            EngineSpec {
                pod: "p".into(),
                dp_rank: 0,
                model: "m".into(),
            },
            EngineSpec {
                pod: "a:b:7:é".into(),
                dp_rank: 3,
                model: "org/model:v2".into(),
            },
            EngineSpec {
                pod: String::new(),
                dp_rank: 9,
                model: String::new(),
            },
        ] {
            assert_eq!(decode_spec(&encode_spec(&s)), Some(s));
        }
        assert_eq!(decode_spec("0:9:ab"), None);
        assert_eq!(decode_spec("x:1:ab"), None);
    }

    #[test]
    fn data_model_is_as_documented() {
        let srv = RedisServer::start();
        let idx = connect(&srv, "dm");
        let a = idx.add_engine(spec("a")).unwrap();
        let toks: Vec<u32> = (0..32).collect();
        idx.apply(a, &batch(vec![stored(&[10, 11], None, toks.clone(), 16)]))
            .unwrap();
        idx.apply(
            a,
            &batch(vec![stored(&[10], None, toks[..16].to_vec(), 16)]),
        )
        .unwrap();
        let keys = KeyHasher::new().chain(&Namespace::model("m"), &toks, 16);
        let mut c = redis_conn(&srv);
        let field = format!("{}:0", a.0);
        let b0: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(format!("dm:b:{:x}", keys[0].0))
            .query(&mut c)
            .unwrap();
        assert_eq!(b0, HashMap::from([(field.clone(), 2)]));
        let alias: String = redis::cmd("GET").arg("dm:a:b").query(&mut c).unwrap();
        assert_eq!(alias, format!("{:x}", keys[1].0));
        let mut set: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("dm:e:{}", a.0))
            .query(&mut c)
            .unwrap();
        set.sort();
        let mut want = vec![format!("{:x}", keys[0].0), format!("{:x}", keys[1].0)];
        want.sort();
        assert_eq!(set, want);
        let bs: u32 = redis::cmd("HGET")
            .arg("dm:bs")
            .arg(a.0)
            .query(&mut c)
            .unwrap();
        assert_eq!(bs, 16);
        // Removing every announcement deletes the field, the block and the set entry.
        idx.apply(a, &batch(vec![removed(11), removed(10), removed(10)]))
            .unwrap();
        let n: usize = redis::cmd("EXISTS")
            .arg(format!("dm:b:{:x}", keys[0].0))
            .arg(format!("dm:b:{:x}", keys[1].0))
            .arg(format!("dm:e:{}", a.0))
            .query(&mut c)
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn unknown_engines_are_refused() {
        let srv = RedisServer::start();
        let idx = connect(&srv, "u");
        let bogus = EngineId(4242);
        let is_unknown = |r: Result<()>| matches!(r, Err(IndexError::UnknownEngine(_)));
        assert!(is_unknown(idx.apply(bogus, &batch(vec![])).map(|_| ())));
        assert!(is_unknown(idx.remove_engine(bogus)));
        assert!(is_unknown(idx.clear_engine(bogus)));
        // A replica whose cache still lists a removed engine is refused by the scripts.
        let other = connect(&srv, "u");
        let a = idx.add_engine(spec("a")).unwrap();
        assert_eq!(other.engine(a).unwrap().spec, spec("a"));
        idx.remove_engine(a).unwrap();
        let r = other.apply(a, &batch(vec![stored(&[1], None, (0..16).collect(), 16)]));
        assert!(matches!(r, Err(IndexError::UnknownEngine(_))), "{r:?}");
        assert!(other.engine_id(&spec("a")).unwrap().is_none());
    }

    #[test]
    fn purge_runs_in_chunks() {
        let srv = RedisServer::start();
        let idx = connect(&srv, "p");
        let a = idx.add_engine(spec("a")).unwrap();
        let n = PURGE_CHUNK * 2 + 7;
        let toks: Vec<u32> = (0..(n * 4) as u32).collect();
        let hashes: Vec<u64> = (100..100 + n as u64).collect();
        idx.apply(a, &batch(vec![stored(&hashes, None, toks.clone(), 4)]))
            .unwrap();
        let ns = Namespace::model("m");
        let q = Query {
            namespace: &ns,
            blocks: QueryBlocks::Tokens {
                tokens: &toks,
                mm: &[],
            },
            engines: None,
        };
        assert_eq!(idx.query(&q).unwrap()[0].matched_blocks as usize, n);
        idx.apply(a, &batch(vec![KvEvent::AllBlocksCleared]))
            .unwrap();
        assert!(idx.query(&q).unwrap().is_empty());
        let mut c = redis_conn(&srv);
        let keys: Vec<String> = redis::cmd("KEYS").arg("p:b:*").query(&mut c).unwrap();
        assert!(keys.is_empty());
    }

    #[test]
    fn survives_script_flush_and_killed_connections() {
        let srv = RedisServer::start();
        let idx = connect(&srv, "s");
        let a = idx.add_engine(spec("a")).unwrap();
        let mut c = redis_conn(&srv);
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut c).unwrap();
        let toks: Vec<u32> = (0..16).collect();
        idx.apply(a, &batch(vec![stored(&[1], None, toks.clone(), 16)]))
            .unwrap();
        assert_eq!(query(&idx, &toks).len(), 1);
        // Kill every other client: the query retries on a new connection; the next write
        // reconnects (the failed one reports an error, since a write is not retried).
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("SKIPME")
            .arg("yes")
            .query(&mut c)
            .unwrap();
        assert_eq!(query(&idx, &toks).len(), 1);
        let ev = batch(vec![removed(1)]);
        if idx.apply(a, &ev).is_err() {
            idx.apply(a, &ev).unwrap();
        }
        assert!(query(&idx, &toks).is_empty());
    }

    #[test]
    fn other_replicas_learn_engines_and_block_sizes() {
        let srv = RedisServer::start();
        let r1 = connect(&srv, "g");
        let r2 = connect(&srv, "g");
        let toks: Vec<u32> = (0..64).collect();
        assert!(query(&r1, &toks).is_empty());
        // r1's cache is now stale: r2 registers engines and learns their block sizes.
        let a = r2.add_engine(spec("a")).unwrap();
        let b = r2.add_engine(spec("b")).unwrap();
        r2.apply(
            a,
            &batch(vec![stored(&[1, 2], None, toks[..32].to_vec(), 16)]),
        )
        .unwrap();
        r2.apply(b, &batch(vec![stored(&[3], None, toks[..32].to_vec(), 32)]))
            .unwrap();
        let r = query(&r1, &toks);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (&*r[0].name, r[0].matched_blocks, r[0].matched_tokens),
            ("a", 2, 32)
        );
        assert_eq!(
            (&*r[1].name, r[1].matched_blocks, r[1].matched_tokens),
            ("b", 1, 32)
        );
        let engines = r1.engines().unwrap();
        assert_eq!(engines.len(), 2);
        assert_eq!(engines[1].block_size, Some(32));
        assert_eq!(r1.engine_id(&spec("b")).unwrap(), Some(b));
        r2.remove_engine(b).unwrap();
        assert_eq!(query(&r1, &toks).len(), 1);
        let s = r1.stats().unwrap();
        assert_eq!(s.engines, 1);
        assert!(s.bytes > 0);
        assert_eq!(s.queries, 3);
    }

    #[test]
    fn concurrent_registration_agrees_on_ids() {
        let srv = RedisServer::start();
        let url = srv.url();
        let replicas: Vec<RedisIndex> = (0..4)
            .map(|_| RedisIndex::connect(&url, "c", IndexConfig::default()).unwrap())
            .collect();
        let ids: Vec<Vec<EngineId>> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        (0..50)
                            .map(|i| r.add_engine(spec(&format!("e{i}"))).unwrap())
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|v| v == &ids[0]));
        let mut distinct = ids[0].clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 50);
    }
}
