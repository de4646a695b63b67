//! The Lua scripts the Redis bus runs. Each touches keys of one hash tag (`keys.rs`), so each
//! runs on one shard, atomically. Times come from the shard's own clock (`TIME`), never from a
//! host's: leases then mean the same on every host, whatever their clocks say. Redis 7
//! replicates a script's effects, not the script, so a replica never re-reads the clock.
//!
//! The frequent ones (counts, renewals, direct messages) go by their SHA1 (EVALSHA): the body
//! is not sent, nor hashed by Redis, on every call. A node that does not know a script (it was
//! restarted, or is a replica just promoted: Redis does not replicate its script cache) answers
//! NOSCRIPT; the bridge then loads every script on every master and sends the command again.

use fred::types::{ClusterHash, CustomCommand, Value};
use fred::util::redis_keyslot;

/// A script and its SHA1.
pub struct Script {
    pub body: &'static str,
    pub sha: String,
}

impl Script {
    fn new(body: &'static str) -> Script {
        Script {
            body,
            sha: sha1_smol::Sha1::from(body).digest().to_string(),
        }
    }

    /// EVALSHA as a command a pipeline can carry (fred pipelines lack `eval`), sent to the
    /// shard of its first key. The slot is computed here: fred routes a custom command by its
    /// first string argument (the SHA1, here) unless it is given the slot itself, and every
    /// command sent to the wrong shard costs a MOVED and a fresh read of the cluster's slots.
    pub fn call(&self, keys: Vec<String>, args: Vec<Value>) -> (CustomCommand, Vec<Value>) {
        let slot = keys.first().map_or(0, |k| redis_keyslot(k.as_bytes()));
        let mut v: Vec<Value> = vec![self.sha.as_str().into(), (keys.len() as i64).into()];
        v.extend(keys.into_iter().map(Value::from));
        v.extend(args);
        let cmd = CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false);
        (cmd, v)
    }
}

/// A plain command on one key (`EXISTS`, `HDEL`), sent to the key's shard: fred's typed
/// commands for them need features the bus does not otherwise use.
pub fn keyed(name: &'static str, key: String, args: Vec<Value>) -> (CustomCommand, Vec<Value>) {
    let slot = redis_keyslot(key.as_bytes());
    let mut v: Vec<Value> = vec![key.into()];
    v.extend(args);
    (
        CustomCommand::new_static(name, ClusterHash::Custom(slot), false),
        v,
    )
}

/// The scripts sent by SHA1, hashed once.
pub struct Scripts {
    pub count: Script,
    pub renew: Script,
    pub direct: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            count: Script::new(COUNT),
            renew: Script::new(RENEW),
            direct: Script::new(DIRECT),
        }
    }

    pub fn all(&self) -> [&Script; 3] {
        [&self.count, &self.renew, &self.direct]
    }
}

/// Whether a command failed because the node does not know the script.
pub fn unknown_script(e: &fred::error::Error) -> bool {
    e.details().contains("NOSCRIPT")
}

/// Writes this process's member count of a room and returns every process's count of it
/// (`HGETALL`: field, count, field, count, ...). The bridge adds up the counts of the processes
/// it knows to be alive (their alive keys, which live in other slots than a room's, so a script
/// cannot read them) and forgets the others' fields. The hash itself expires `ARGV[3]` ms after
/// the last write, so the counts of processes that all died unseen go away by themselves; a
/// live process writes each of its rooms again well within that (`ROOM_REFRESH`).
/// KEYS[1] the room's count hash; ARGV[1] this process's field, ARGV[2] its count (0 removes
/// it), ARGV[3] the hash's time to live in ms.
pub const COUNT: &str = r#"
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local all = redis.call('HGETALL', KEYS[1])
if #all > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return all
"#;

/// Writes this process's count of a room again, without reading anything back: the slow
/// refresh of every room held, which keeps the hash from expiring.
/// KEYS[1] the room's count hash; ARGV[1] this process's field, ARGV[2] its count (0 removes
/// it), ARGV[3] the hash's time to live in ms.
pub const RENEW: &str = r#"
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The SHA1 Redis files a script under (SCRIPT LOAD "return 1" answers this).
    #[test]
    fn a_scripts_name_is_the_sha1_of_its_body() {
        assert_eq!(
            Script::new("return 1").sha,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
        let s = Scripts::new();
        let (cmd, args) = s.count.call(vec!["tg:n:{r}".into()], vec![Value::from(1)]);
        assert_eq!(args.len(), 4, "sha, number of keys, the key, the argument");
        // Routed to the shard of the key's hash tag, the same as the room's channel.
        assert_eq!(
            cmd.cluster_hash,
            ClusterHash::Custom(redis_keyslot(b"tg:r:{r}"))
        );
    }
}
