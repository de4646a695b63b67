//! A small blocking WebSocket client for the server tests, and a handle on a running
//! `tunegate serve`. Written from RFC 6455 independently of the server's codec (it shares no
//! code with the relay crate), so the two cannot agree on a mistake.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::bin;

/// `tunegate serve` on a free loopback port; SIGKILLed on drop if still running.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(Command::new(bin()), args)
    }

    /// Starts `cmd serve --listen 127.0.0.1:0 ARGS` (cmd may be a wrapper such as prlimit).
    pub fn start_with(cmd: Command, args: &[&str]) -> Server {
        Server::start_on(cmd, "127.0.0.1:0", args)
    }

    /// Starts `cmd serve --listen LISTEN ARGS`; `addr` is the first address it listens on.
    pub fn start_on(mut cmd: Command, listen: &str, args: &[&str]) -> Server {
        if cmd.get_program() != bin() {
            cmd.arg(bin());
        }
        let mut child = cmd
            .args(["serve", "--listen", listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tunegate serve");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).expect("read the listening line");
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(line));
        let sink = log.clone();
        // Line by line, so a test can read what the server logged while it runs.
        std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Server {
            child,
            addr,
            stderr: log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the server to exit (at most `limit`, then the test fails).
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        super::eventually(
            limit,
            || "the server to exit".into(),
            || self.child.try_wait().unwrap(),
        )
    }

    /// One plain HTTP GET; returns (status, whole response).
    pub fn get(&self, path: &str) -> (u16, String) {
        http(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"),
        )
    }

    /// Sums a metric's samples (all label sets) from /metrics.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The server's CPU time so far (user + system), from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = stat.rsplit(')').next().unwrap();
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        ticks
            / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .unwrap()
                .unwrap() as f64
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a raw request and reads until the server closes; (status, response).
pub fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

pub struct Ws {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Answer server pings automatically (a live client) or not (a silent one).
    pub auto_pong: bool,
}

/// The upgrade request every test client sends (RFC 6455's example key).
pub const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A client frame, masked as RFC 6455 requires.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

impl Ws {
    pub fn connect(addr: SocketAddr) -> Ws {
        Ws::connect_path(addr, "/")
    }

    pub fn connect_path(addr: SocketAddr, path: &str) -> Ws {
        let stream = TcpStream::connect(addr).expect("connect");
        Ws::handshake(stream, path).expect("handshake")
    }

    pub fn handshake(mut stream: TcpStream, path: &str) -> Result<Ws, String> {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        Ws::after_upgrade(stream)
    }

    /// Reads the server's answer to an upgrade request already sent on `stream`.
    pub fn after_upgrade(mut stream: TcpStream) -> Result<Ws, String> {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        // RFC 6455 4.2.2 example key -> accept value.
        if !head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") {
            return Err(format!("bad accept: {head}"));
        }
        buf.drain(..end);
        Ok(Ws {
            stream,
            buf,
            auto_pong: true,
        })
    }

    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_frame(true, opcode, payload);
    }

    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = masked_frame(fin, opcode, payload);
        self.stream.write_all(&f).expect("send frame");
    }

    pub fn send_json(&mut self, v: serde_json::Value) {
        self.send(1, v.to_string().as_bytes());
    }

    /// Next frame from the server (pings answered and skipped when `auto_pong`).
    pub fn recv(&mut self) -> Option<Frame> {
        loop {
            let f = self.read_frame()?;
            if f.opcode == 9 && self.auto_pong {
                self.send(10, &f.payload.clone());
                continue;
            }
            return Some(f);
        }
    }

    /// Next data message as JSON.
    pub fn recv_json(&mut self) -> serde_json::Value {
        let f = self.recv().expect("a message, not EOF");
        assert_eq!(f.opcode, 1, "expected a text frame, got {f:?}");
        serde_json::from_slice(&f.payload).expect("JSON")
    }

    /// Reads until a Close frame (returns its code) or EOF (None).
    pub fn recv_close(&mut self) -> Option<u16> {
        loop {
            let f = self.read_frame()?;
            if f.opcode == 8 {
                return Some(if f.payload.len() >= 2 {
                    u16::from_be_bytes([f.payload[0], f.payload[1]])
                } else {
                    1005
                });
            }
        }
    }

    fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("timed out waiting for a frame")
                }
                Err(e) => {
                    eprintln!("ws test client: read failed: {e}");
                    return None;
                }
            }
        }
    }

    /// Waits up to `limit` for a frame; None if none came (the connection stays usable).
    /// True when the server's end of the stream closes (EOF or reset) within `limit`, whatever
    /// frames come first; false if it is still open then.
    pub fn ends_within(&mut self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut chunk = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    pub fn try_recv(&mut self, limit: Duration) -> Option<Frame> {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let out = loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                break Some(frame);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => break None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        };
        let out = match out {
            Some(f) if f.opcode == 9 && self.auto_pong => {
                self.send(10, &f.payload);
                Some(f)
            }
            other => other,
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        out
    }
}

/// One unmasked server frame from the front of `buf`: (frame, bytes used).
fn parse(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    Some((
        Frame {
            fin: buf[0] & 0x80 != 0,
            opcode: buf[0] & 0x0f,
            payload: buf[at..at + len].to_vec(),
        },
        at + len,
    ))
}

/// Test clients by the worker that holds them: (client, its connection id).
pub type Clients = std::collections::HashMap<usize, Vec<(Ws, u64)>>;

/// The incarnation of the process that handed out a connection id: the 12 bits below the
/// node, bits 33 to 44 (docs/protocol.md). Tests map it to a worker through what they started.
pub fn incarnation_of(id: u64) -> u16 {
    ((id >> 33) & 0xfff) as u16
}

/// The node of the host that handed out a connection id: its top 8 bits (docs/protocol.md).
pub fn node_of(id: u64) -> u8 {
    (id >> 45) as u8
}

/// Connects with `connect` until the kernel's SO_REUSEPORT spread has given each of `workers`
/// `per` clients (`worker_of` tells which worker an id belongs to); connections landing
/// elsewhere are closed. Bounded: 10 s.
pub fn spread(
    connect: impl Fn() -> Ws,
    worker_of: impl Fn(u64) -> Option<usize>,
    workers: &[usize],
    per: usize,
) -> Clients {
    let mut by_worker = Clients::new();
    let start = Instant::now();
    while workers
        .iter()
        .any(|w| by_worker.get(w).map_or(0, Vec::len) < per)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "spread too uneven"
        );
        let mut ws = connect();
        let id = ws.recv_json()["id"].as_u64().unwrap();
        if let Some(w) = worker_of(id).filter(|w| workers.contains(w)) {
            let list = by_worker.entry(w).or_default();
            if list.len() < per {
                list.push((ws, id));
            }
        }
    }
    by_worker
}

/// Waits until `ws` sees `room` with `want` members on the whole server (counts travel the bus).
pub fn await_count(ws: &mut Ws, room: &str, want: u64) {
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let what = || {
        format!(
            "{room} to have {want} members (last answer: {})",
            last.borrow()
        )
    };
    super::eventually_true(Duration::from_secs(5), what, || {
        ws.send_json(json!({"op": "count", "room": room}));
        let c = ws.recv_json();
        assert_eq!(c["op"], "count", "{c}");
        let done = c["members"] == want;
        *last.borrow_mut() = c;
        done
    });
}

/// Every client joins `room` (and reads its reply).
pub fn join_all<'a>(clients: impl IntoIterator<Item = &'a mut (Ws, u64)>, room: &str) {
    for (ws, _) in clients {
        ws.send_json(json!({"op": "join", "room": room}));
        assert_eq!(ws.recv_json()["op"], "joined");
    }
}

/// `publisher` publishes `n` messages tagged `tag`; every other client in `members` receives
/// each exactly once, in order, and nothing else.
pub fn publish_and_check(
    c: &mut Clients,
    publisher: (usize, usize),
    members: &[usize],
    tag: &str,
    n: u64,
) {
    let pws = &mut c.get_mut(&publisher.0).unwrap()[publisher.1].0;
    for seq in 0..n {
        pws.send_json(json!({"op": "publish", "room": "all", "data": {"seq": seq, "tag": tag}}));
    }
    for &w in members {
        for (i, (ws, _)) in c.get_mut(&w).unwrap().iter_mut().enumerate() {
            if (w, i) == publisher {
                continue;
            }
            for seq in 0..n {
                let m = ws.recv_json();
                assert_eq!(
                    (
                        m["op"].as_str(),
                        m["data"]["tag"].as_str(),
                        m["data"]["seq"].as_u64()
                    ),
                    (Some("message"), Some(tag), Some(seq)),
                    "worker {w} client {i}"
                );
            }
            ws.send_json(json!({"op": "count", "room": "all", "ref": "sync"}));
            assert_eq!(
                ws.recv_json()["ref"],
                "sync",
                "worker {w} client {i}: extra message"
            );
        }
    }
}
