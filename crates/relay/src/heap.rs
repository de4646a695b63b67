//! Handing the allocator's free pages back to the kernel after connections come and go.
//!
//! Handshakes, joins and handoffs allocate short-lived buffers among long-lived room entries
//! and connection state. When a burst of them is over, glibc's malloc keeps the freed chunks
//! in its arenas for reuse and gives memory back to the kernel only from the top of an arena,
//! so pages that hold nothing but free chunks between live ones stay resident for as long as
//! the process lives. `malloc_trim(0)` walks every arena and releases each whole free page
//! wherever it lies (madvise(MADV_DONTNEED)); a page used again later faults in zeroed.
//!
//! Each event loop asks for a trim from its own tick ([`Keeper`]) once a burst is over: at
//! least [`CHURN`] connections opened, arrived from another worker or ended since its last
//! trim, and fewer than a tenth of that in the last [`CHECK_EVERY_MS`]; a burst that never
//! pauses is trimmed at least every [`LONGEST_WAIT_MS`]. An idle server is never touched;
//! steady churn, about once a minute at most. The loop trims itself rather than a thread
//! beside it: `malloc_trim` holds each arena's lock while it walks it, and a helper thread
//! preempted there on a saturated host (measured: one call of 555 ms among 1,580 at a million
//! connections, mean 0.45 ms) would stall every loop that allocates meanwhile; the loop only
//! pauses itself, as a sweep does. With several loops in a process each trims on its own
//! churn (a trim covers every arena, so one more is only a walk over what is already free).
//!
//! The server side's one unsafe call is fenced here (the supervisor's `pre_exec` in
//! src/daemon/child.rs is the other in tunegate).

/// How often a loop looks at its counters, in milliseconds.
pub const CHECK_EVERY_MS: u32 = 5_000;

/// Connections opened, moved in or ended since the last trim that make the next one worth it.
pub const CHURN: u64 = 1_000;

/// A burst this long without a pause (from the first check at which a trim was worth it)
/// still gets a trim, in milliseconds.
pub const LONGEST_WAIT_MS: u32 = 60_000;

/// When a loop should trim: from its clock and its churn counter (connections accepted, moved
/// in and ended so far, which only grows).
#[derive(Debug, Default)]
pub struct Keeper {
    checked_ms: u32,
    churn_at_check: u64,
    churn_at_trim: u64,
    /// The last check at which a trim was not yet worth it: how long one has waited since.
    pending_ms: u32,
}

impl Keeper {
    /// Whether to trim now; called every tick.
    pub fn due(&mut self, now_ms: u32, churn: u64) -> bool {
        if now_ms.wrapping_sub(self.checked_ms) < CHECK_EVERY_MS {
            return false;
        }
        let recent = churn.saturating_sub(self.churn_at_check);
        self.checked_ms = now_ms;
        self.churn_at_check = churn;
        let pending = churn.saturating_sub(self.churn_at_trim);
        if pending < CHURN {
            self.pending_ms = now_ms;
            return false;
        }
        // Over: the last check's interval brought under a tenth of what is pending (a
        // health check or a scrape every second, or a trickle of clients, does not keep a
        // burst going).
        let over = recent < pending / 10;
        if !over && now_ms.wrapping_sub(self.pending_ms) < LONGEST_WAIT_MS {
            return false;
        }
        self.churn_at_trim = churn;
        self.pending_ms = now_ms;
        true
    }
}

/// Gives every arena's free pages back to the kernel; returns how much that took off this
/// process's resident anonymous memory, in bytes.
pub fn trim() -> u64 {
    let before = resident_anonymous();
    malloc_trim();
    before.saturating_sub(resident_anonymous())
}

/// This process's resident anonymous memory in bytes (0 if /proc cannot tell): resident
/// pages less the file-backed and shared ones, from /proc/self/statm.
fn resident_anonymous() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: Vec<u64> = statm
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    match pages[..] {
        [_, resident, shared, ..] => resident.saturating_sub(shared) * page,
        _ => 0,
    }
}

#[allow(unsafe_code)]
fn malloc_trim() {
    // SAFETY: malloc_trim takes a plain integer (the padding to leave at the top of the main
    // arena) and no pointers. glibc takes each arena's lock while it trims that arena, so any
    // thread may call it while others allocate, and it only releases pages inside free chunks:
    // no live allocation is moved, freed or changed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory touched and freed in the middle of the heap, with live allocations among it (so
    /// glibc's own trim of the top cannot give it back), is no longer resident after a trim.
    #[test]
    fn a_trim_gives_back_free_pages_between_live_allocations() {
        // Chunks below the mmap threshold come from this thread's arena; a small one kept
        // after every 64, as room entries sit among freed request buffers.
        let mut freed = Vec::new();
        let mut kept = Vec::new();
        for i in 0..16 * 1024 {
            let mut chunk = vec![0u8; 2048];
            chunk[0] = i as u8;
            chunk[2047] = 1;
            freed.push(chunk);
            if i % 64 == 0 {
                kept.push(vec![1u8; 32]);
            }
        }
        drop(freed);
        let before = resident_anonymous();
        let given_back = trim();
        assert!(before > 0, "statm unreadable");
        // 32 MiB were touched and freed; at least a quarter of it comes back whatever the
        // test process's other threads do meanwhile.
        assert!(
            given_back >= 8 << 20,
            "{given_back} bytes given back of {before}"
        );
        assert_eq!(kept.len(), 256);
    }

    /// A trim comes once a burst of at least 1,000 is over (a check that brought under a tenth
    /// of what is pending), or within a minute of a churn that never pauses; never for less,
    /// never between checks.
    #[test]
    fn a_trim_is_due_after_a_burst_not_during_it_and_never_when_idle() {
        let mut k = Keeper::default();
        // Idle for ten minutes: never.
        assert!((1..=120).all(|i| !k.due(i * 5_000 + 1, 0)));
        let t = 600_001;
        // 3,000 arrive within the first check; the next check (quiet) trims.
        assert!(!k.due(t + 1_000, 3_000), "between checks");
        assert!(
            !k.due(t + 5_000, 3_000),
            "the burst came in this check's interval"
        );
        assert!(k.due(t + 10_000, 3_050), "the burst is over");
        assert!(!k.due(t + 15_000, 3_060), "nothing since");
        // 999 more, quietly: not enough.
        assert!(!k.due(t + 20_000, 3_500));
        assert!(!k.due(t + 25_000, 4_049));
        assert!(!k.due(t + 30_000, 4_049));
        // A steady 300 a second: one trim a minute.
        let mut churn = 4_049;
        let mut trims = Vec::new();
        for i in 1..=36 {
            churn += 1_500;
            if k.due(t + 30_000 + i * 5_000, churn) {
                trims.push(i * 5);
            }
        }
        // Once ten checks' worth is pending (15,000 after the 999 left from before), then
        // every eleven checks.
        assert_eq!(trims, [50, 105, 160], "seconds into the steady churn");
        // Churn that grows as fast as it accumulates is never "over": a minute.
        let mut k = Keeper::default();
        let (mut churn, mut trims) = (0, Vec::new());
        for i in 1..=30u32 {
            churn += 1_000 * u64::from(i);
            if k.due(i * 5_000, churn) {
                trims.push(i * 5);
            }
        }
        assert_eq!(trims, [60, 120], "seconds into the growing churn");
        // The clock wraps (u32 milliseconds, every 49.7 days): checks go on across it.
        let mut k = Keeper::default();
        assert!(!k.due(u32::MAX - 1_000, 0));
        assert!(
            !k.due(u32::MAX.wrapping_add(3_999), 5_000),
            "between checks"
        );
        assert!(!k.due(u32::MAX.wrapping_add(4_001), 5_000), "the burst");
        assert!(k.due(u32::MAX.wrapping_add(9_001), 5_000), "over");
    }
}
