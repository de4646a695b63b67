//! Maps and sets keyed by names that come from the network (room names): hashed with a keyed
//! hasher whose key is random per process (std's SipHash-1-3 `RandomState`), so nobody can
//! precompute names that collide. FxHash, fine for our own integers, is not keyed: names built
//! for it all land in one bucket and turn every join into a walk over all of them (the test
//! below builds such names). Integer-keyed maps keep FxHash.

use std::collections::{HashMap, HashSet};
use std::hash::RandomState;
use std::sync::Arc;

/// A map from a network-chosen name.
pub type NameMap<V> = HashMap<Arc<str>, V, RandomState>;
/// A set of network-chosen names.
pub type NameSet = HashSet<Arc<str>, RandomState>;

#[cfg(test)]
pub(crate) mod adversarial {
    //! Room names that all collide under rustc-hash 2.1's FxHash, the hasher rooms used before:
    //! 32 ASCII bytes each. Its string hash for 17 to 32 bytes ends in
    //! `mix(SEED2 ^ u, mix(SEED1 ^ x, K ^ y) ^ v)` over the words x, y, u, v: with u fixed and v
    //! chosen as `mix(SEED1 ^ x, K ^ y) ^ C`, every name hashes to `mix(SEED2 ^ u, C)`; random
    //! x and y are tried until v is ASCII too (one in 256).

    const SEED1: u64 = 0x243f6a8885a308d3;
    const PREVENT_TRIVIAL_ZERO_COLLAPSE: u64 = 0xa4093822299f31d0;

    fn mix(x: u64, y: u64) -> u64 {
        let full = (x as u128).wrapping_mul(y as u128);
        (full as u64) ^ ((full >> 64) as u64)
    }

    /// ASCII, so valid UTF-8 (a room name in JSON may hold control characters escaped).
    fn ascii(w: u64) -> bool {
        w & 0x8080_8080_8080_8080 == 0
    }

    /// `n` distinct names of 32 ASCII bytes with one FxHash.
    pub fn names(n: usize) -> Vec<String> {
        const C: u64 = 0x4141_4141_4141_4141; // "AAAAAAAA": keeps v's top bits clear often
        let u = u64::from_le_bytes(*b"fixedmid");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand_ascii = || {
            let mut w = [0u8; 8];
            for b in &mut w {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = b'a' + (state % 26) as u8;
            }
            u64::from_le_bytes(w)
        };
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let (x, y) = (rand_ascii(), rand_ascii());
            let v = mix(SEED1 ^ x, PREVENT_TRIVIAL_ZERO_COLLAPSE ^ y) ^ C;
            if ascii(v) {
                let mut name = Vec::with_capacity(32);
                for w in [x, y, u, v] {
                    name.extend_from_slice(&w.to_le_bytes());
                }
                out.push(String::from_utf8(name).expect("ASCII"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn names_built_to_collide_under_fxhash_spread_under_the_keyed_hasher() {
        let names = adversarial::names(2000);
        let fx = rustc_hash::FxBuildHasher;
        let fx_hashes: HashSet<u64> = names.iter().map(|n| fx.hash_one(n.as_str())).collect();
        assert_eq!(fx_hashes.len(), 1, "the names do collide under FxHash");
        let keyed = RandomState::new();
        let spread: HashSet<u64> = names.iter().map(|n| keyed.hash_one(n.as_str())).collect();
        assert_eq!(spread.len(), names.len(), "and not under the keyed hasher");
        // The map the relay uses takes them all, each findable.
        let mut map: NameMap<usize> = NameMap::default();
        for (i, n) in names.iter().enumerate() {
            map.insert(Arc::from(n.as_str()), i);
        }
        assert!(
            names
                .iter()
                .enumerate()
                .all(|(i, n)| map.get(n.as_str()) == Some(&i))
        );
    }
}
