//! The Lua scripts the Redis bus runs. Each touches keys of one hash tag (`keys.rs`), so each
//! runs on one shard, atomically. Times come from the shard's own clock (`TIME`), never from a
//! host's: leases then mean the same on every host, whatever their clocks say. Redis 7
//! replicates a script's effects, not the script, so a replica never re-reads the clock.

/// Writes this process's member count of a room and returns the room's total over every
/// process whose lease has not lapsed, dropping lapsed ones.
/// KEYS[1] the room's count hash; ARGV[1] this process's field, ARGV[2] its count (0 removes
/// it), ARGV[3] the lease in ms.
pub const COUNT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + lease))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local total = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local count, expiry = string.match(all[i + 1], '^(%d+):(%d+)$')
  if count and tonumber(expiry) > now then
    total = total + tonumber(count)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if total > 0 then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return total
"#;

/// Publishes a direct message on a process's channel. Returns the receivers (1 normally); 0
/// when nobody listens and the process is dead (its alive lease lapsed or was removed): the
/// connection is gone; -1 when nobody listens but the process is alive: it is between
/// subscriptions (a failover, a restart of Redis), and the message may be tried again.
/// KEYS[1] the process's channel, KEYS[2] its alive key; ARGV[1] the message.
pub const DIRECT: &str = r#"
local n = redis.call('SPUBLISH', KEYS[1], ARGV[1])
if n == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
return n
"#;

/// Claims a key for an owner, or renews the owner's claim: `ok`, or the other owner's name.
/// KEYS[1] the key; ARGV[1] the owner, ARGV[2] the lease in ms.
pub const CLAIM: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'ok'
end
return holder
"#;

/// Removes a key if the owner still holds it (a clean stop gives its claims back at once).
/// KEYS[1] the key; ARGV[1] the owner.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;
