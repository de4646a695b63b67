//! TLS on the listener (`--tls-cert`, `--tls-key`): wss:// and https:// (/healthz, /metrics) on
//! the same port, with rustls (ring, already in the tree for the Redis bus), TLS 1.2 and 1.3
//! only.
//!
//! `Certs` holds the server configuration every new connection starts from; `reload` (on
//! SIGHUP) reads the files again and swaps it, so renewed certificates take effect without
//! dropping a connection: those open keep the session they have.
//!
//! `Session` is one connection's TLS state, as the transport sees it: plaintext in and out, and
//! the ciphertext pushed to the socket. rustls's buffers are emptied as soon as the socket or
//! the loop takes what is in them, and what the socket refuses beyond `SENDABLE_LIMIT` of
//! ciphertext stays in the connection's own output queue (still shared frames, still counted
//! against `--max-pending-output`), so an idle TLS connection keeps no buffer of ours.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use nix::errno::Errno;
use rustls::ServerConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::sys::FdIo as Fd;

/// Ciphertext rustls may hold for one connection before its writer says "full" and the rest
/// waits, as plaintext, in the connection's output queue.
const SENDABLE_LIMIT: usize = 64 * 1024;

/// The certificate chain and key files, and the configuration made from them.
pub struct Certs {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} and {}", self.cert.display(), self.key.display())
    }
}

impl Certs {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> Result<Certs, String> {
        Ok(Certs {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(server_config(cert, key)?)),
        })
    }

    /// Reads the files again; on success new connections use them, on failure nothing changes.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = Arc::new(server_config(&self.cert, &self.key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// A session for a connection just accepted.
    pub fn session(&self) -> io::Result<Session> {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(SENDABLE_LIMIT));
        Ok(Session {
            conn: Box::new(conn),
            notified: false,
        })
    }

    pub fn files(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "--tls-cert {} with --tls-key {}: {e}",
                cert.display(),
                key.display()
            )
        })
}

/// What a read from a TLS connection gave.
pub enum Recv {
    /// Plaintext bytes, in the caller's buffer.
    Data(usize),
    /// Nothing more until the socket is readable again.
    Again,
    /// The peer closed (with or without close_notify).
    Eof,
    /// The peer broke the TLS protocol (the alert is on its way) or the socket failed.
    Failed(String),
}

/// One connection's TLS state: rustls's connection (boxed: a TLS server pays for it per
/// connection, a plain one never), and whether close_notify went out.
pub struct Session {
    conn: Box<ServerConnection>,
    notified: bool,
}

fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

impl Session {
    /// Plaintext into `buf`: what rustls already decrypted, else what the socket has.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Recv {
        loop {
            match self.conn.reader().read(buf) {
                Ok(0) => return Recv::Eof, // close_notify
                Ok(n) => return Recv::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Recv::Eof, // the peer went without close_notify
            }
            match self.conn.read_tls(&mut Fd(fd)) {
                Ok(0) => return Recv::Eof,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Recv::Again,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Recv::Failed(e.to_string()),
            }
            if let Err(e) = self.conn.process_new_packets() {
                let _ = self.push(fd); // the alert, if the socket takes it
                return Recv::Failed(e.to_string());
            }
            // Handshake messages, session tickets, a reply to a key update.
            if self.conn.wants_write() && self.push(fd) == Err(Errno::EPIPE) {
                return Recv::Eof;
            }
        }
    }

    /// Ciphertext rustls holds, to the socket, until it is all out or the socket is full.
    /// `Ok(true)`: nothing left in rustls.
    pub fn push(&mut self, fd: BorrowedFd<'_>) -> Result<bool, Errno> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Fd(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(&e)),
            }
        }
        Ok(true)
    }

    /// Plaintext to send: encrypted and pushed until all of it is out or the socket is full
    /// (then, and only then, less than all is taken: the caller queues the rest and the
    /// socket's next EPOLLOUT brings it here again, as for a plain socket). rustls holds at
    /// most `SENDABLE_LIMIT` of ciphertext meanwhile. `EAGAIN` when it took nothing.
    pub fn send(&mut self, fd: BorrowedFd<'_>, slices: &[IoSlice<'_>]) -> Result<usize, Errno> {
        let mut taken = 0;
        'slices: for slice in slices {
            let mut off = 0;
            while off < slice.len() {
                if !self.push(fd)? {
                    break 'slices; // the socket is full
                }
                let k = self
                    .conn
                    .writer()
                    .write(&slice[off..])
                    .map_err(|e| errno(&e))?;
                if k == 0 {
                    break 'slices; // cannot happen with an empty rustls buffer; never spin
                }
                off += k;
                taken += k;
            }
        }
        self.push(fd)?;
        if taken == 0 && slices.iter().any(|s| !s.is_empty()) {
            return Err(Errno::EAGAIN);
        }
        Ok(taken)
    }

    /// Whether ciphertext waits for the socket.
    pub fn pending(&self) -> bool {
        self.conn.wants_write()
    }

    /// Our last bytes are out: tell the peer (close_notify, once) before the write side
    /// shuts. `true` once it is on the wire (or the socket failed: nothing more to wait for).
    pub fn close_notify(&mut self, fd: BorrowedFd<'_>) -> bool {
        if !self.notified {
            self.conn.send_close_notify();
            self.notified = true;
        }
        self.push(fd).unwrap_or(true)
    }

    /// Still in the TLS handshake.
    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        std::fs::write(&key, "not a key\n").unwrap();
        let e = Certs::load(&cert, &key).unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("cert.pem"), "{e}");
        let e = Certs::load(&dir.path().join("missing.pem"), &key).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
