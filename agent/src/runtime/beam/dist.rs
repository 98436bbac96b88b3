//! A minimal Erlang distribution client: connects to one local node as a hidden node (the
//! `erl_dist` crate does the epmd lookup, the handshake and the framing) and calls functions in
//! it the way `erpc:call/4` does (`spawn_request` of `erpc:execute_call/4` with a monitor; the
//! monitor's exit reason is the answer).
//!
//! What `erl_rpc` (which this mirrors) does not do and this does: TCP_NODELAY on the socket
//! (without it every call waits for a delayed ACK, ~40 ms), a deadline on connecting and on
//! every call (the connection is dropped on a timeout, the next call reconnects), the epmd port
//! from `ERL_EPMD_PORT`, a long host name for nodes started with `-name`, and ticks while a long
//! call is waited for.
//!
//! A call that is abandoned (timeout, agent killed) keeps running in the node: the process it
//! spawned is monitored, not linked.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use erl_dist::DistributionFlags;
use erl_dist::epmd::EpmdClient;
use erl_dist::handshake::{ClientSideHandshake, HandshakeStatus};
use erl_dist::message::{self, Message};
use erl_dist::node::{Creation, LocalNode, NodeName};
use erl_dist::term::{Atom, FixInteger, List, Mfa, Pid, PidOrAtom, Reference, Term};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Ticks we send while waiting for a long call (the node drops a connection silent for
/// `net_ticktime`, 60 s by default).
const TICK_INTERVAL: Duration = Duration::from_secs(10);
/// An idle connection older than this is replaced rather than reused: we send no ticks while
/// idle, so the node may have dropped it.
const MAX_IDLE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DistError {
    #[error("cannot reach Erlang node {node}: {message}")]
    Connect { node: String, message: String },
    #[error("call {call} on {node} did not answer within {timeout:?}")]
    Timeout {
        node: String,
        call: String,
        timeout: Duration,
    },
    #[error("call {call} on {node} raised {class}: {reason}")]
    Raised {
        node: String,
        call: String,
        class: String,
        reason: String,
    },
    #[error("connection to {node} lost during {call}: {message}")]
    Lost {
        node: String,
        call: String,
        message: String,
    },
}

impl DistError {
    /// The node could not be reached at all (as opposed to a call that failed in it).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, DistError::Connect { .. })
    }
}

/// Where and how to reach a node.
#[derive(Debug, Clone)]
pub struct NodeAddress {
    /// `name@host`.
    pub node: String,
    pub cookie: String,
    pub epmd_port: u16,
}

/// The epmd port the Erlang tools use: `ERL_EPMD_PORT`, else 4369.
pub fn epmd_port_from_env() -> u16 {
    std::env::var("ERL_EPMD_PORT")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(erl_dist::epmd::DEFAULT_EPMD_PORT)
}

/// A client of one node; calls are serialised over one cached connection.
#[derive(Debug)]
pub struct DistClient {
    address: NodeAddress,
    /// Replaced by [`DistClient::set_cookie`]; a new cookie drops the connection.
    cookie: std::sync::Mutex<String>,
    conn: Mutex<Option<Conn>>,
}

#[derive(Debug)]
struct Conn {
    tx: message::Sender<Shared>,
    rx: message::Receiver<Shared>,
    local: LocalNode,
    last_used: Instant,
    /// Set by the runtime once its helper module is known to be loaded on this connection's
    /// node incarnation.
    helper_ready: bool,
}

impl DistClient {
    pub fn new(address: NodeAddress) -> Self {
        Self {
            cookie: std::sync::Mutex::new(address.cookie.clone()),
            address,
            conn: Mutex::new(None),
        }
    }

    /// Use `cookie` from the next connection on (the current one is dropped if it differs).
    pub async fn set_cookie(&self, cookie: String) {
        let changed = match self.cookie.lock() {
            Ok(mut current) if *current != cookie => {
                *current = cookie;
                true
            }
            _ => false,
        };
        if changed {
            self.reset().await;
        }
    }

    pub fn node(&self) -> &str {
        &self.address.node
    }

    /// Forget the connection (the node was restarted or is being stopped).
    pub async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    /// Whether the helper was marked ready on the current connection.
    pub async fn helper_ready(&self) -> bool {
        self.conn
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| c.helper_ready)
    }

    pub async fn set_helper_ready(&self) {
        if let Some(c) = self.conn.lock().await.as_mut() {
            c.helper_ready = true;
        }
    }

    /// `Module:Function(Args...)` in the node, within `timeout` (connecting included).
    pub async fn call(
        &self,
        module: &str,
        function: &str,
        args: Vec<Term>,
        timeout: Duration,
    ) -> Result<Term, DistError> {
        let call = format!("{module}:{function}/{}", args.len());
        let mut slot = self.conn.lock().await;
        let started = Instant::now();
        if slot
            .as_ref()
            .is_some_and(|c| c.last_used.elapsed() > MAX_IDLE)
        {
            *slot = None;
        }
        if slot.is_none() {
            let mut address = self.address.clone();
            if let Ok(cookie) = self.cookie.lock() {
                address.cookie = cookie.clone();
            }
            let conn = tokio::time::timeout(timeout, connect(&address))
                .await
                .map_err(|_| DistError::Connect {
                    node: self.address.node.clone(),
                    message: format!("no answer within {timeout:?}"),
                })??;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(DistError::Connect {
                node: self.address.node.clone(),
                message: "no connection".into(),
            });
        };
        let left = timeout.saturating_sub(started.elapsed());
        let result = tokio::time::timeout(
            left,
            conn.call(module, function, args, &self.address, &call),
        )
        .await;
        match result {
            Ok(Ok(term)) => {
                conn.last_used = Instant::now();
                Ok(term)
            }
            Ok(Err(e @ DistError::Raised { .. })) => {
                conn.last_used = Instant::now();
                Err(e)
            }
            Ok(Err(e)) => {
                *slot = None;
                Err(e)
            }
            Err(_) => {
                // The reply may still come on this connection: never reuse it.
                *slot = None;
                Err(DistError::Timeout {
                    node: self.address.node.clone(),
                    call,
                    timeout,
                })
            }
        }
    }
}

impl Conn {
    fn pid(&self) -> Pid {
        Pid::new(
            Atom::from(self.local.name.to_string()),
            0,
            0,
            self.local.creation.get(),
        )
    }

    fn make_ref(&self) -> Reference {
        Reference {
            node: Atom::from(self.local.name.to_string()),
            id: vec![rand::random(), rand::random(), rand::random()],
            creation: self.local.creation.get(),
        }
    }

    async fn call(
        &mut self,
        module: &str,
        function: &str,
        args: Vec<Term>,
        address: &NodeAddress,
        call: &str,
    ) -> Result<Term, DistError> {
        let lost = |message: String| DistError::Lost {
            node: address.node.clone(),
            call: call.to_string(),
            message,
        };
        let req_id = self.make_ref();
        let request = Message::spawn_request(
            req_id.clone(),
            self.pid(),
            self.pid(),
            Mfa {
                module: "erpc".into(),
                function: "execute_call".into(),
                arity: FixInteger::from(4),
            },
            List::from(vec![Atom::from("monitor").into()]),
            List::from(vec![
                self.make_ref().into(),
                Atom::from(module).into(),
                Atom::from(function).into(),
                List::from(args).into(),
            ]),
        );
        self.tx
            .send(request)
            .await
            .map_err(|e| lost(format!("send: {e}")))?;

        let tx = &mut self.tx;
        let rx = &mut self.rx;
        let reply = async {
            loop {
                match rx.recv().await {
                    Ok(Message::MonitorPExit(exit)) if exit.reference == req_id => {
                        return Ok(exit.reason);
                    }
                    Ok(Message::SpawnReply(reply)) if reply.req_id == req_id => {
                        if let PidOrAtom::Atom(reason) = reply.result {
                            return Err(lost(format!("spawn_request refused: {}", reason.name)));
                        }
                    }
                    // Ticks and anything else (a late reply of an abandoned call cannot happen:
                    // such a connection is dropped) are ignored.
                    Ok(_) => {}
                    Err(e) => return Err(lost(format!("receive: {e}"))),
                }
            }
        };
        let ticks = async {
            loop {
                tokio::time::sleep(TICK_INTERVAL).await;
                if tx.send(Message::Tick).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let reason = tokio::select! {
            reason = reply => reason?,
            () = ticks => return Err(lost("the tick loop stopped".into())),
        };
        decode_reply(reason, address, call)
    }
}

/// `{Ref, return, Value}` or `{Ref, Class, Reason}` (erpc:execute_call/4's exit reason).
fn decode_reply(reason: Term, address: &NodeAddress, call: &str) -> Result<Term, DistError> {
    let raised = |class: &str, reason: String| DistError::Raised {
        node: address.node.clone(),
        call: call.to_string(),
        class: class.to_string(),
        reason,
    };
    match reason {
        Term::Tuple(mut tuple) if tuple.elements.len() == 3 => {
            let value = tuple.elements.pop().unwrap_or(Term::from(List::nil()));
            match tuple.elements.pop() {
                Some(Term::Atom(kind)) if kind.name == "return" => Ok(value),
                Some(Term::Atom(kind)) => Err(raised(&kind.name, value.to_string())),
                _ => Err(raised("exit", value.to_string())),
            }
        }
        other => Err(raised("exit", other.to_string())),
    }
}

async fn connect(address: &NodeAddress) -> Result<Conn, DistError> {
    let fail = |message: String| DistError::Connect {
        node: address.node.clone(),
        message,
    };
    let name: NodeName = address
        .node
        .parse()
        .map_err(|e| fail(format!("bad node name: {e}")))?;
    let host = name.host().to_string();

    let epmd = TcpStream::connect((host.as_str(), address.epmd_port))
        .await
        .map_err(|e| fail(format!("epmd at {host}:{}: {e}", address.epmd_port)))?;
    let _ = epmd.set_nodelay(true);
    let entry = EpmdClient::new(Shared::new(epmd))
        .get_node(name.name())
        .await
        .map_err(|e| fail(format!("epmd: {e}")))?
        .ok_or_else(|| {
            fail(format!(
                "`{}` is not registered with epmd at {host}:{}",
                name.name(),
                address.epmd_port
            ))
        })?;
    if entry.highest_version < 6 {
        return Err(fail(
            "the node speaks only distribution protocol 5 (OTP 23 or later is needed)".into(),
        ));
    }

    let stream = TcpStream::connect((host.as_str(), entry.port))
        .await
        .map_err(|e| fail(format!("{host}:{}: {e}", entry.port)))?;
    stream
        .set_nodelay(true)
        .map_err(|e| fail(format!("TCP_NODELAY: {e}")))?;
    // A name the node assigns (NAME_ME); its host part must be of the same kind as the node's
    // (a node started with -name refuses short host names).
    let tentative = format!("hotroll@{host}");
    let mut local = LocalNode::new(
        tentative
            .parse()
            .map_err(|e| fail(format!("local name: {e}")))?,
        Creation::random(),
    );
    local.flags |= DistributionFlags::NAME_ME
        | DistributionFlags::SPAWN
        | DistributionFlags::DIST_MONITOR
        | DistributionFlags::DIST_MONITOR_NAME;
    let mut handshake =
        ClientSideHandshake::new(Shared::new(stream), local.clone(), &address.cookie);
    let status = handshake
        .execute_send_name(6)
        .await
        .map_err(|e| fail(format!("handshake: {e}")))?;
    let HandshakeStatus::Named { name, creation } = status else {
        return Err(fail(format!("unexpected handshake status {status:?}")));
    };
    local.name = NodeName::new(&name, &host).map_err(|e| fail(format!("assigned name: {e}")))?;
    local.creation = creation;
    let (connection, peer) = handshake
        .execute_rest(true)
        .await
        .map_err(|e| fail(format!("handshake: {e} (is the cookie right?)")))?;
    let (tx, rx) = message::channel(connection, local.flags & peer.flags);
    Ok(Conn {
        tx,
        rx,
        local,
        last_used: Instant::now(),
        helper_ready: false,
    })
}

/// A tokio TCP stream shared by the sending and the receiving half of a channel (erl_dist wants
/// a `Clone` stream with the `futures` I/O traits). Reads and writes go through `&TcpStream`,
/// which tokio supports concurrently.
#[derive(Debug, Clone)]
struct Shared(Arc<TcpStream>);

impl Shared {
    fn new(stream: TcpStream) -> Self {
        Self(Arc::new(stream))
    }
}

impl futures::io::AsyncRead for Shared {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.0.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.0.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

impl futures::io::AsyncWrite for Shared {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.0.poll_write_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
