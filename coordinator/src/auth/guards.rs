//! [`Guarded`]: how every gRPC service is mounted. Before a call reaches the service, the guard
//! looks its path up in [`METHODS`](super::policy::METHODS), refuses a method the table does
//! not know, and authenticates and authorizes the caller for what the method needs. A node's
//! identity goes along in the request's extensions ([`NodeIdentity`]), for the services to
//! compare with what the node says.
//!
//! Two methods get one extra each, next to the table: an upload takes one of its client's
//! upload slots while it runs, and a session ends when the certificate it was opened with
//! expires.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use super::credentials::{Auth, Caller};
use super::limits::MAX_CONCURRENT_UPLOADS;
use super::policy::{Access, MethodRule, NodeIdentity, Principal, rule_for};

/// The method whose calls each take one of the client's upload slots while they run.
const UPLOAD_ARTIFACT: &str = "/hotroll.v1.Control/UploadArtifact";
/// The long-lived stream a node certificate opens: it ends when the certificate expires (the
/// agent has renewed by then and reconnects with the new one).
const SESSION: &str = "/hotroll.v1.Agent/Session";

/// A gRPC service (tonic's generated server) behind the checks of [`Auth`].
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    auth: Arc<Auth>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, auth: Arc<Auth>) -> Self {
        Self { inner, auth }
    }
}

impl<S> std::fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded").finish_non_exhaustive()
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

/// What an admitted call holds while it runs.
#[derive(Debug, Default)]
struct Admission {
    upload_slot: Option<OwnedSemaphorePermit>,
    session_deadline: Option<Instant>,
}

impl<S> Guarded<S> {
    /// Whether the call may go on, and what it holds while it runs.
    #[allow(clippy::result_large_err)]
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<Admission, Status> {
        let caller = Caller::of(request.extensions());
        let Some(rule) = rule_for(request.uri().path()) else {
            let method = request.uri().path();
            tracing::warn!(peer = %caller.peer(), method, "refused: a method without an access rule");
            return Err(Status::unimplemented(format!(
                "`{method}` is not a method this coordinator serves"
            )));
        };
        let mut admission = Admission::default();
        match rule.access {
            Access::Open => {}
            Access::Node => {
                if let Some(identity) = self.auth.node(&caller, rule)? {
                    if rule.path == SESSION {
                        admission.session_deadline = Some(expiry_of(&identity));
                    }
                    request.extensions_mut().insert(identity);
                }
            }
            Access::Read | Access::Write => {
                let authorization = request.headers().get(http::header::AUTHORIZATION);
                let principal = self.auth.client(&caller, authorization, rule)?;
                if rule.access == Access::Write {
                    tracing::info!(%principal, method = rule.path, "operator call");
                }
                if rule.path == UPLOAD_ARTIFACT {
                    admission.upload_slot = Some(self.upload_slot(&principal, rule)?);
                }
            }
        }
        Ok(admission)
    }

    #[allow(clippy::result_large_err)]
    fn upload_slot(
        &self,
        principal: &Principal,
        rule: &MethodRule,
    ) -> Result<OwnedSemaphorePermit, Status> {
        self.auth
            .uploads
            .acquire(&principal.client_key())
            .ok_or_else(|| {
                tracing::warn!(%principal, method = rule.path, "upload refused: too many uploads in flight");
                Status::resource_exhausted(format!(
                    "at most {MAX_CONCURRENT_UPLOADS} uploads at a time per client"
                ))
            })
    }
}

/// When the certificate of `identity` expires, on the runtime's clock.
fn expiry_of(identity: &NodeIdentity) -> Instant {
    let left = identity
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Instant::now() + left
}

impl<S, B> Service<http::Request<B>> for Guarded<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let admission = match self.admit(&mut request) {
            Ok(admission) => admission,
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        // The service that was polled ready takes this call; a clone waits for the next one.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let response = ready.call(request);
        Box::pin(async move {
            let response = response.await?;
            // tonic's future resolves once the handler returned: the upload is over.
            drop(admission.upload_slot);
            Ok(match admission.session_deadline {
                Some(deadline) => response.map(|body| Body::new(UntilExpiry::new(body, deadline))),
                None => response,
            })
        })
    }
}

/// A session's response body until `deadline`, then an UNAVAILABLE status (the trailers that
/// end the stream), which makes the agent reconnect.
struct UntilExpiry {
    inner: Body,
    expiry: Pin<Box<Sleep>>,
    ended: bool,
}

impl UntilExpiry {
    fn new(inner: Body, deadline: Instant) -> Self {
        Self {
            inner,
            expiry: Box::pin(tokio::time::sleep_until(deadline)),
            ended: false,
        }
    }
}

impl http_body::Body for UntilExpiry {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.ended = frame.is_none();
            return Poll::Ready(frame);
        }
        if this.expiry.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.ended = true;
        let expired = Status::unavailable(
            "the node certificate of this session expired; reconnect with the renewed one",
        );
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(
            expired
                .add_header(&mut trailers)
                .map(|()| Frame::trailers(trailers)),
        ))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body::Body as _;
    use tokio::sync::Semaphore;
    use tonic::Code;

    use super::*;

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .uri(format!("http://coordinator{path}"))
            .body(Body::empty())
            .unwrap()
    }

    fn code(response: &http::Response<Body>) -> Option<Code> {
        Status::from_header_map(response.headers()).map(|s| s.code())
    }

    /// A service that counts its calls and answers each once `gate` gives it a permit.
    fn gated(
        gate: Arc<Semaphore>,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: http::Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            async move {
                let _open = gate.acquire().await;
                Ok::<_, Infallible>(http::Response::new(Body::empty()))
            }
        })
    }

    #[tokio::test]
    async fn a_method_without_a_rule_never_reaches_the_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = gated(Arc::new(Semaphore::new(1)), calls.clone());
        let mut guard = Guarded::new(inner, Arc::new(Auth::insecure()));
        let refused = guard
            .call(request("/hotroll.v1.Control/DropEverything"))
            .await
            .unwrap();
        assert_eq!(code(&refused), Some(Code::Unimplemented));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // With TLS off, a known method goes through whatever it needs.
        let served = guard
            .call(request("/hotroll.v1.Control/AbortRollout"))
            .await
            .unwrap();
        assert_eq!(code(&served), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn uploads_beyond_the_limit_are_refused_with_tls_off_too() {
        let gate = Arc::new(Semaphore::new(0));
        let inner = gated(gate.clone(), Arc::new(AtomicUsize::new(0)));
        let mut guard = Guarded::new(inner, Arc::new(Auth::insecure()));
        // The slot is taken when the call is admitted and held until the service answers.
        let held: Vec<_> = (0..MAX_CONCURRENT_UPLOADS)
            .map(|_| tokio::spawn(guard.call(request(UPLOAD_ARTIFACT))))
            .collect();
        let refused = guard.call(request(UPLOAD_ARTIFACT)).await.unwrap();
        assert_eq!(code(&refused), Some(Code::ResourceExhausted));
        // Other methods are not limited.
        let other = guard.call(request("/hotroll.v1.Control/ListNodes"));
        gate.add_permits(MAX_CONCURRENT_UPLOADS + 1);
        assert_eq!(code(&other.await.unwrap()), None);
        for call in held {
            assert_eq!(code(&call.await.unwrap().unwrap()), None);
        }
        gate.add_permits(1);
        let again = guard.call(request(UPLOAD_ARTIFACT)).await.unwrap();
        assert_eq!(code(&again), None);
    }

    /// A response body that never sends anything (an idle session).
    struct Idle;

    impl http_body::Body for Idle {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Pending
        }
    }

    async fn next_frame(body: &mut UntilExpiry) -> Option<Result<Frame<Bytes>, Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_unavailable_when_its_certificate_expires() {
        let started = Instant::now();
        let mut body = UntilExpiry::new(Body::new(Idle), started + Duration::from_secs(60));
        let frame = next_frame(&mut body).await.unwrap().unwrap();
        assert!(started.elapsed() >= Duration::from_secs(60));
        let trailers = frame.into_trailers().unwrap();
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("expired"), "{status:?}");
        assert!(next_frame(&mut body).await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_ends_first_ends_as_it_did() {
        let mut body = UntilExpiry::new(Body::empty(), Instant::now() + Duration::from_secs(60));
        assert!(next_frame(&mut body).await.is_none());
        assert!(body.is_end_stream());
    }
}
