//! Request bodies under the edge's limits: at most `max_body` bytes, all of them within
//! `body_read_timeout` of the headers.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Body;
use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Sleep;

use crate::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    TooLarge { limit: u64 },
    Timeout { after: Duration },
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { limit } => write!(f, "request body is larger than {limit} bytes"),
            Self::Timeout { after } => {
                write!(f, "request body not received within {after:?}")
            }
        }
    }
}

impl std::error::Error for BodyError {}

impl BodyError {
    pub fn to_api_error(&self) -> ApiError {
        match self {
            Self::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                self.to_string(),
            ),
            Self::Timeout { .. } => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                self.to_string(),
            ),
        }
    }
}

/// A request body that fails once it passes `limit` bytes or its deadline. The timer is
/// armed only when the body has to be waited for: most bodies arrive with their headers.
pub(crate) struct Bounded<B> {
    inner: B,
    read: u64,
    limit: u64,
    timeout: Duration,
    started: tokio::time::Instant,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<B> Bounded<B> {
    pub(crate) fn new(inner: B, limit: u64, timeout: Duration) -> Self {
        Self {
            inner,
            read: 0,
            limit,
            timeout,
            started: tokio::time::Instant::now(),
            deadline: None,
        }
    }
}

impl<B> HttpBody for Bounded<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    me.read += data.len() as u64;
                    if me.read > me.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyError::TooLarge {
                            limit: me.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let (started, timeout) = (me.started, me.timeout);
                let deadline = me
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(started + timeout)));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(BodyError::Timeout {
                        after: me.timeout,
                    }))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The whole body, at most `limit` bytes. A body cut off by the edge's limits answers 413
/// or 408; a client that went away answers 400 (nobody reads it).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
            while let Some(err) = source {
                if let Some(b) = err.downcast_ref::<BodyError>() {
                    return Err(b.to_api_error());
                }
                if err
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return Err(BodyError::TooLarge {
                        limit: limit as u64,
                    }
                    .to_api_error());
                }
                source = err.source();
            }
            Err(ApiError::bad_request(format!("reading request body: {e}")))
        }
    }
}
