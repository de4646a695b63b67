use super::*;

fn policy(max_crashes: u32) -> Policy {
    Policy {
        restart: Restart {
            policy: RestartPolicy::OnFailure,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_crashes,
            crash_window_s: 60,
        },
        stop_grace: Duration::from_millis(500),
        ready_timeout: Duration::from_secs(2),
        listen: "127.0.0.1:8080".into(),
    }
}

/// A supervisor with a fake clock, whose spawns always succeed with pids 100, 101, ...
struct Sim {
    sup: Supervisor,
    now: Instant,
    next_pid: u32,
    log: Vec<Action>,
}

impl Sim {
    fn new(p: Policy, n: usize) -> Sim {
        let now = Instant::now();
        Sim {
            sup: Supervisor::new(p, n, now),
            now,
            next_pid: 100,
            log: Vec::new(),
        }
    }

    /// Feeds an event and carries out spawns at once, like the plumbing.
    fn feed(&mut self, e: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let mut queue = vec![e];
        while let Some(e) = queue.pop() {
            for a in self.sup.handle(e) {
                if let Action::Spawn(worker) = a {
                    self.next_pid += 1;
                    queue.push(Event::Started {
                        worker,
                        pid: self.next_pid,
                        at: self.now,
                    });
                }
                out.push(a);
            }
        }
        self.log.extend(out.clone());
        out
    }

    fn advance(&mut self, ms: u64) -> Vec<Action> {
        self.now += Duration::from_millis(ms);
        self.feed(Event::Tick(self.now))
    }

    fn pid(&self, i: usize) -> u32 {
        self.sup.workers()[i].pid.expect("running")
    }

    fn listen_all(&mut self) -> Vec<Action> {
        for (worker, pid) in self.sup.awaiting_listen() {
            self.feed(Event::Listening { worker, pid });
        }
        self.advance(50)
    }

    fn exit(&mut self, i: usize, failed: bool) -> Vec<Action> {
        let pid = self.pid(i);
        self.feed(Event::Exited {
            worker: i,
            pid,
            failed,
            how: if failed {
                "was killed by SIGKILL"
            } else {
                "exited with status 0"
            }
            .into(),
            at: self.now,
            jitter: 0.0,
        })
    }
}

fn logged(actions: &[Action], needle: &str) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Log(_, m) | Action::Status(_, m) if m.contains(needle)))
}

#[test]
fn every_worker_starts_then_ready_once_all_listen() {
    let mut s = Sim::new(policy(5), 3);
    let first = s.advance(0);
    assert_eq!(
        first
            .iter()
            .filter(|a| matches!(a, Action::Spawn(_)))
            .count(),
        3
    );
    assert!(!first.contains(&Action::Ready));
    let ready = s.listen_all();
    assert_eq!(ready, [Action::Ready]);
    assert!(s.sup.ready());
    assert!(s.advance(50).is_empty(), "READY=1 is said once");
}

#[test]
fn a_dead_worker_is_restarted_alone_with_exponential_backoff() {
    let mut s = Sim::new(policy(10), 2);
    s.advance(0);
    s.listen_all();
    let other = s.pid(1);
    let mut delays = Vec::new();
    for _ in 0..4 {
        let out = s.exit(0, true);
        assert!(
            logged(&out, "the other 1 worker(s) keep serving"),
            "{out:?}"
        );
        assert!(out.contains(&Action::Status(
            "running",
            match &out[1] {
                Action::Log(_, m) => m.clone(),
                a => panic!("{a:?}"),
            }
        )));
        // Not before its time.
        let mut waited = 0;
        while !s.advance(10).iter().any(|a| matches!(a, Action::Spawn(0))) {
            waited += 10;
            assert!(waited < 5000);
        }
        delays.push(waited + 10);
        s.listen_all();
    }
    assert_eq!(delays, [100, 200, 400, 800]);
    assert_eq!(s.pid(1), other, "the other worker was left alone");
    assert_eq!(s.sup.workers()[0].restarts, 4);
    assert_eq!(
        backoff(&policy(1).restart, 30, 1.0),
        Duration::from_millis(1200)
    );
    assert_eq!(
        backoff(&policy(1).restart, 1, -1.0),
        Duration::from_millis(80)
    );
}

#[test]
fn a_crash_loop_stops_everything_and_ends_with_1() {
    let mut s = Sim::new(policy(3), 2);
    s.advance(0);
    s.listen_all();
    s.exit(0, true);
    s.advance(150);
    s.exit(0, true);
    s.advance(250);
    let out = s.exit(0, true);
    assert!(
        logged(&out, "crash loop: worker 0 failed 3 times within 60 s"),
        "{out:?}"
    );
    let survivor = s.pid(1);
    assert!(out.contains(&Action::Term(survivor)));
    assert!(!out.iter().any(|a| matches!(a, Action::Exit(_))));
    let end = s.exit(1, false);
    assert!(end.contains(&Action::Exit(1)), "{end:?}");
    assert!(end.iter().any(|a| matches!(a, Action::Status("failed", _))));
    assert!(
        s.advance(10_000).is_empty(),
        "nothing restarts after the end"
    );
}

#[test]
fn a_clean_exit_under_on_failure_ends_the_daemon_with_0() {
    let mut s = Sim::new(policy(3), 1);
    s.advance(0);
    s.listen_all();
    let out = s.exit(0, false);
    assert!(logged(&out, "the child ("), "{out:?}");
    assert!(logged(&out, "not restarting (OnFailure)"), "{out:?}");
    assert!(out.contains(&Action::Exit(0)), "{out:?}");
}

#[test]
fn stop_terms_everyone_kills_the_stubborn_and_exits_0_when_all_are_gone() {
    let mut s = Sim::new(policy(3), 2);
    s.advance(0);
    s.listen_all();
    let (a, b) = (s.pid(0), s.pid(1));
    let out = s.feed(Event::Stop {
        why: "SIGTERM",
        at: s.now,
    });
    assert!(out.contains(&Action::Term(a)) && out.contains(&Action::Term(b)));
    s.exit(0, false);
    assert!(
        s.advance(100).is_empty(),
        "worker 1 still has its grace period"
    );
    let kill = s.advance(500);
    assert!(kill.contains(&Action::Kill(b)), "{kill:?}");
    assert!(logged(&kill, "ignored SIGTERM for 500 ms: SIGKILL"));
    let end = s.exit(1, true);
    assert!(end.contains(&Action::Exit(0)), "{end:?}");
    assert!(end.contains(&Action::Status("stopped", "SIGTERM".into())));
}

#[test]
fn a_worker_that_never_listens_is_stopped_and_counts_as_a_crash() {
    let mut s = Sim::new(policy(5), 1);
    s.advance(0);
    let pid = s.pid(0);
    let out = s.advance(2100);
    assert!(out.contains(&Action::Term(pid)), "{out:?}");
    assert!(logged(
        &out,
        "did not listen on 127.0.0.1:8080 within 2000 ms"
    ));
    // It exits 0 when asked; still a failure: restarted with backoff.
    let out = s.exit(0, false);
    assert!(
        logged(&out, "never listened (exited with status 0)"),
        "{out:?}"
    );
    assert!(logged(&out, "restarting in 100 ms"), "{out:?}");
}

#[test]
fn a_reload_replaces_stale_workers_one_at_a_time_once_the_others_listen() {
    let mut s = Sim::new(policy(5), 3);
    s.advance(0);
    s.listen_all();
    let before: Vec<u32> = (0..3).map(|i| s.pid(i)).collect();
    s.feed(Event::Replace {
        workers: vec![0, 2],
    });
    let out = s.advance(50);
    assert!(out.contains(&Action::Term(before[0])), "{out:?}");
    assert!(logged(&out, "replacing worker 0 for the new settings"));
    // Nothing else is touched while worker 0 is being replaced.
    assert!(s.advance(50).is_empty());
    let out = s.exit(0, false);
    assert!(logged(&out, "starting its replacement"), "{out:?}");
    let respawn = s.advance(50);
    assert!(respawn.contains(&Action::Spawn(0)), "{respawn:?}");
    // Worker 2 waits until the new worker 0 listens.
    assert!(!s.advance(50).iter().any(|a| matches!(a, Action::Term(_))));
    let out = s.listen_all();
    assert!(out.contains(&Action::Term(before[2])), "{out:?}");
    s.exit(2, false);
    s.advance(50);
    s.listen_all();
    assert_eq!(s.pid(1), before[1]);
    assert!(
        s.sup.workers().iter().all(|w| w.restarts == 0),
        "a replacement is not a restart"
    );
}

#[test]
fn a_resize_stops_all_then_starts_the_new_count_on_a_fresh_bus() {
    let mut s = Sim::new(policy(5), 2);
    s.advance(0);
    s.listen_all();
    let out = s.feed(Event::Resize {
        workers: 3,
        at: s.now,
    });
    assert_eq!(
        out.iter().filter(|a| matches!(a, Action::Term(_))).count(),
        2
    );
    s.exit(0, false);
    let out = s.exit(1, false);
    let order: Vec<&Action> = out
        .iter()
        .filter(|a| matches!(a, Action::ResetBus | Action::Spawn(_)))
        .collect();
    assert_eq!(
        order,
        [
            &Action::ResetBus,
            &Action::Spawn(0),
            &Action::Spawn(1),
            &Action::Spawn(2)
        ]
    );
    assert_eq!(s.listen_all(), [Action::Ready]);
}

#[test]
fn a_worker_that_cannot_be_spawned_stops_the_others_and_ends_with_1() {
    let mut s = Sim::new(policy(5), 2);
    s.advance(0);
    s.listen_all();
    let survivor = s.pid(1);
    s.exit(0, true);
    // The plumbing's restart of worker 0 fails (the binary was removed, say).
    let out = s.feed(Event::SpawnFailed {
        worker: 0,
        error: "cannot start tunegate: No such file or directory".into(),
        at: s.now,
    });
    assert!(out.contains(&Action::Term(survivor)), "{out:?}");
    let end = s.exit(1, false);
    assert!(end.contains(&Action::Exit(1)), "{end:?}");
    assert!(end.contains(&Action::Status(
        "failed",
        "cannot start tunegate: No such file or directory".into()
    )));
}
