//! switchyard's listening service: its own accept loop in place of
//! Pingora's `listening::Service`, for every listener (HTTP, HTTPS, admin
//! and metrics).
//!
//! Why: Pingora spawns one task per accepted connection whose future holds
//! `timeout(handshake())` inline, and that TLS handshake state is 7 168
//! bytes (release build), on plain listeners too. The task lives as long as
//! the connection, so every idle kept-alive client paid for it: about half
//! of the 15 KiB it cost (README, Benchmarks). switchyard does its own TLS
//! handshake ([`crate::tls::handshake`], boxed and freed once done), so the
//! task spawned here holds only the connection's serving future, a pointer.
//!
//! What Pingora's service did and this one keeps:
//! - Graceful upgrade: each listening socket is taken from, or recorded in,
//!   Pingora's table of listening descriptors ([`ListenFds`]) under its
//!   address as written (`127.0.0.1:8080`), so `switchyard --upgrade` takes
//!   the sockets over from a running instance, Pingora's or this one's
//!   alike, and hands them on at the next.
//! - Sockets: `SO_REUSEADDR`, a backlog of 65 535 (capped by the kernel's
//!   `net.core.somaxconn`), `TCP_NODELAY` on each connection, the peer's
//!   address in the connection's socket digest.
//! - Connections spread over the worker threads (Pingora's runtime picks a
//!   thread at random for each), `server.listener_tasks_per_fd` accept tasks
//!   per socket, accepting stops when shutdown begins while connections
//!   already accepted are served on.
//!
//! What differs:
//! - A listening socket that cannot be bound stops the process with one
//!   clear error line and exit status 1 (Pingora retried for 30 s, then
//!   panicked in its service thread), except during a graceful upgrade
//!   ([`Listener::upgrading`]).
//! - An accept error that is not the one connection's (out of descriptors,
//!   say) is retried after [`ACCEPT_BACKOFF`] (500 ms), where Pingora
//!   waited 1 s after EMFILE only and retried anything else at once.
//! - A connection's stream has no read buffer (none was used before
//!   either: Pingora's own reads, 4 KiB and up, made one useless while it
//!   was zero-filled and held per connection) and no write buffer:
//!   gathering a response's head and body into one write is the HTTP/1
//!   connection wrapper's job ([`crate::slow_clients`]); HTTP/2 buffers its
//!   frames itself.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Pending connections the kernel queues per listening socket (65 535, as
/// Pingora asks; Linux caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 65_535;

/// Pause after an accept that failed for a reason other than the one
/// connection's, typically out of descriptors or memory (500 ms, nginx's
/// pause in the same case): retrying at once would spin, and connections
/// closing meanwhile free what the next accept needs. The connections
/// waiting meanwhile stay in the listen backlog.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

/// Why a listening socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
struct ListenError {
    /// The address as configured.
    address: SocketAddr,
    /// What the system said (address in use, not this host's, ...).
    #[source]
    source: io::Error,
}

/// A listening service on one TCP address whose connections `app` serves.
pub struct Listener<A> {
    name: String,
    address: SocketAddr,
    app: Option<Arc<A>>,
    threads: Option<usize>,
    upgrading: bool,
}

impl<A> Listener<A> {
    /// A service named `name` (in Pingora's logs) serving `app` on
    /// `address`, on the server's worker threads.
    pub fn new(name: &str, app: A, address: SocketAddr) -> Self {
        Listener {
            name: name.to_string(),
            address,
            app: Some(Arc::new(app)),
            threads: None,
            upgrading: false,
        }
    }

    /// Runs on `threads` worker threads of its own instead of the
    /// server's `threads`.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Marks a start that takes over a running instance's sockets
    /// (`run -u`): an address that cannot be bound is then logged and left
    /// unserved instead of stopping the process, because the old process
    /// has already handed over its sockets and is draining, and exiting
    /// would leave nothing serving.
    pub fn upgrading(mut self, upgrading: bool) -> Self {
        self.upgrading = upgrading;
        self
    }
}

/// The key of `address` in Pingora's table of listening descriptors: its
/// text as Pingora's own listener writes it, so that an upgrade from a
/// build on Pingora's listener finds it too.
fn fd_key(address: SocketAddr) -> String {
    address.to_string()
}

/// Opens the listening socket of `address`: the one inherited through
/// `fds` on a graceful upgrade, or a fresh one, recorded there to be handed
/// on at the next upgrade.
///
/// Errors: the address is in use or not this host's, or an inherited
/// descriptor is not a listening TCP socket.
fn listen(address: SocketAddr, fds: Option<&ListenFds>) -> Result<TcpListener, ListenError> {
    let failed = |source| ListenError { address, source };
    let socket = match fds {
        Some(table) => {
            let mut table = table.lock();
            let key = fd_key(address);
            match table.get(&key) {
                // SAFETY: the table holds descriptors Pingora received
                // from the process before this one, one per address, and
                // no other listener here has this address (the config
                // refuses overlapping ones), so nothing else owns it.
                Some(&fd) => unsafe { Socket::from_raw_fd(fd) },
                None => {
                    let socket = bind(address).map_err(failed)?;
                    table.add(key, socket.as_raw_fd());
                    socket
                }
            }
        }
        None => bind(address).map_err(failed)?,
    };
    // Listening again on an inherited socket only updates its backlog.
    socket.listen(LISTEN_BACKLOG).map_err(failed)?;
    socket.set_nonblocking(true).map_err(failed)?;
    TcpListener::from_std(socket.into()).map_err(failed)
}

/// A fresh TCP socket bound to `address`.
fn bind(address: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // Restarts do not wait out connections in TIME_WAIT on the port.
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

/// Whether an accept error belongs to the one connection being accepted:
/// the client gave up or reset it, or a network error was pending on it
/// (Linux reports those from accept, `accept(2)`, "Error handling"). The
/// next accept may succeed at once.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EPERM
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::EOPNOTSUPP
                | libc::ETIMEDOUT
        )
    )
}

/// Resolves once shutdown has begun (or the server is gone).
async fn stopping(shutdown: &mut ShutdownWatch) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Accepts connections on `listener` until shutdown begins, each served in
/// a task of its own on a worker thread chosen by Pingora's runtime.
async fn accept_loop<A>(listener: Arc<TcpListener>, app: Arc<A>, mut shutdown: ShutdownWatch)
where
    A: ServerApp + Send + Sync + 'static,
{
    loop {
        let accepted = tokio::select! {
            biased;
            () = stopping(&mut shutdown) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let (app, shutdown) = (app.clone(), shutdown.clone());
                pingora_runtime::current_handle().spawn(serve(tcp, peer, app, shutdown));
            }
            Err(e) if transient(&e) => tracing::debug!(cause = %e, "accept failed"),
            // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
            // ENOMEM), which only connections closing cure, or a fault of
            // the listening socket itself: retried after a pause, never in
            // a spin, and not past the start of shutdown.
            Err(e) => {
                tracing::error!(cause = %e, retry_in = ?ACCEPT_BACKOFF, "cannot accept a connection");
                tokio::select! {
                    biased;
                    () = stopping(&mut shutdown) => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Serves one accepted connection: Pingora's stream around it, then `app`
/// for as long as it hands the connection back for reuse.
async fn serve<A>(tcp: TcpStream, peer: SocketAddr, app: Arc<A>, shutdown: ShutdownWatch)
where
    A: ServerApp + Send + Sync + 'static,
{
    let mut stream = L4Stream::from(tcp);
    if let Err(e) = stream.set_nodelay() {
        // The client is usually gone already (a reset before this ran).
        tracing::debug!(cause = %e, %peer, "connection closed: cannot set TCP_NODELAY");
        return;
    }
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    // A fresh digest's address cell is empty, so this cannot fail.
    let _ = digest.peer_addr.set(Some(PeerAddr::Inet(peer)));
    stream.set_socket_digest(digest);
    let mut next = app.process_new(Box::new(stream), &shutdown).await;
    while let Some(stream) = next {
        next = app.process_new(stream, &shutdown).await;
    }
}

#[async_trait]
impl<A> Service for Listener<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let Some(app) = self.app.take() else {
            return; // started once already
        };
        let listener = match listen(self.address, fds.as_ref()) {
            Ok(listener) => Arc::new(listener),
            Err(e) if self.upgrading => {
                tracing::error!(
                    "{e}; not served until a restart (the sockets taken over keep serving)"
                );
                return;
            }
            Err(e) => {
                // Nothing would answer on this address: stop, clearly.
                tracing::error!("{e}");
                std::process::exit(1);
            }
        };
        let tasks: Vec<_> = (0..listeners_per_fd.max(1))
            .map(|_| tokio::spawn(accept_loop(listener.clone(), app.clone(), shutdown.clone())))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
        app.cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        self.threads
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![fd_key(self.address)])
    }
}
