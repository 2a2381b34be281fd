//! A TCP fault proxy for tests: sits between a node and PostgreSQL (or anything TCP) on
//! 127.0.0.1 and can
//! - add latency to every chunk in both directions ([`FaultProxy::set_latency`]);
//! - black-hole the connections ([`FaultProxy::black_hole`]): bytes vanish in both directions,
//!   no FIN and no RST, the sockets stay open — a half-open connection as a partition or a dead
//!   peer leaves it. Connections that were black-holed stay dead after [`FaultProxy::heal`]
//!   (their streams lost bytes); new connections made after it pass again;
//! - reset every open connection ([`FaultProxy::reset_all`]: RST to both sides);
//! - switch its upstream for new connections ([`FaultProxy::set_upstream`], e.g. to a promoted
//!   standby).
//!
//! The proxy runs on the runtime it was started on and stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
struct State {
    upstream: Mutex<SocketAddr>,
    latency: Mutex<Duration>,
    black_hole: AtomicBool,
    /// Bumped by [`FaultProxy::black_hole`]: connections alive then are dead for good.
    doom: watch::Sender<u64>,
    /// Bumped by [`FaultProxy::reset_all`].
    reset: watch::Sender<u64>,
    accepted: AtomicU64,
    open: AtomicU64,
}

/// A running fault proxy; see the module docs.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream: Mutex::new(upstream),
            latency: Mutex::new(Duration::ZERO),
            black_hole: AtomicBool::new(false),
            doom: watch::channel(0).0,
            reset: watch::channel(0).0,
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        let accept = {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    state.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve(Arc::clone(&state), client));
                }
            })
        };
        FaultProxy {
            addr,
            state,
            accept,
        }
    }

    /// A PostgreSQL URL through this proxy to database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}/{db}", self.addr)
    }

    /// Every chunk waits this long before it is passed on (both directions).
    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap() = latency;
    }

    /// From now on bytes vanish: on every open connection (for good) and on every new one
    /// until [`FaultProxy::heal`]. Nothing is closed or reset.
    pub fn black_hole(&self) {
        self.state.black_hole.store(true, Ordering::SeqCst);
        self.state.doom.send_modify(|g| *g += 1);
    }

    /// New connections pass again (connections black-holed so far stay dead).
    pub fn heal(&self) {
        self.state.black_hole.store(false, Ordering::SeqCst);
    }

    /// Resets (RST) every open connection on both sides.
    pub fn reset_all(&self) {
        self.state.reset.send_modify(|g| *g += 1);
    }

    /// New connections go to `upstream`.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.state.upstream.lock().unwrap() = upstream;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now (dead black-holed ones included).
    pub fn open_connections(&self) -> u64 {
        self.state.open.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

struct OpenGuard(Arc<State>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client connection: forwarded, swallowed or reset as the state says.
async fn serve(state: Arc<State>, mut client: TcpStream) {
    state.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(Arc::clone(&state));
    let mut reset = state.reset.subscribe();
    let mut doom = state.doom.subscribe();
    reset.mark_unchanged();
    doom.mark_unchanged();
    let _ = client.set_nodelay(true);
    if state.black_hole.load(Ordering::SeqCst) {
        swallow(&mut client, None, &mut reset).await;
        return;
    }
    let upstream = *state.upstream.lock().unwrap();
    let mut server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            // Upstream down: the client sees its connection reset, as from a closed port.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_server = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = client.read(&mut from_client) => {
                let Ok(n) = n else { break };
                if n == 0 {
                    let _ = server.shutdown().await;
                    // Keep forwarding the other way until the server closes too.
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut rest)).await;
                    let _ = client.write_all(&rest).await;
                    break;
                }
                if !pass(&state, &mut server, &from_client[..n]).await {
                    break;
                }
            }
            n = server.read(&mut from_server) => {
                let Ok(n) = n else { break };
                if n == 0 {
                    let _ = client.shutdown().await;
                    break;
                }
                if !pass(&state, &mut client, &from_server[..n]).await {
                    break;
                }
            }
            _ = doom.changed() => {
                swallow(&mut client, Some(&mut server), &mut reset).await;
                return;
            }
            _ = reset.changed() => {
                let _ = client.set_zero_linger();
                let _ = server.set_zero_linger();
                return;
            }
        }
    }
}

async fn pass(state: &State, to: &mut TcpStream, bytes: &[u8]) -> bool {
    let latency = *state.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    to.write_all(bytes).await.is_ok()
}

/// A dead connection: read and drop everything both ways, never answer, never close, until a
/// reset (or the peer closes).
async fn swallow(
    client: &mut TcpStream,
    mut server: Option<&mut TcpStream>,
    reset: &mut watch::Receiver<u64>,
) {
    let mut a = vec![0u8; 16 * 1024];
    let mut b = vec![0u8; 16 * 1024];
    let mut client_open = true;
    let mut server_open = server.is_some();
    loop {
        tokio::select! {
            n = client.read(&mut a), if client_open => {
                if !matches!(n, Ok(k) if k > 0) { client_open = false; }
            }
            n = async { server.as_mut().unwrap().read(&mut b).await }, if server_open => {
                if !matches!(n, Ok(k) if k > 0) { server_open = false; }
            }
            _ = reset.changed() => {
                let _ = client.set_zero_linger();
                if let Some(s) = server.as_mut() {
                    let _ = s.set_zero_linger();
                }
                return;
            }
        }
        if !client_open {
            return;
        }
        if !server_open && server.is_some() {
            // The server end closed (e.g. PostgreSQL's idle timeout): the client never hears
            // of it — that is the point of a black hole.
            server = None;
        }
    }
}
