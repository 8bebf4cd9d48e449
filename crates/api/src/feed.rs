//! A latest value and its subscribers (a GPU record, a count of pauses or aborts):
//! tokio's `watch` channel, but subscribers are woken in the order they started
//! waiting. tokio's spreads them over eight lists chosen at random, so two sidecars (or
//! two streams) woken by one change would run in a different order on every run; a
//! fleet simulation must replay the same run from the same seed.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

struct Inner<T> {
    value: Arc<T>,
    version: u64,
    closed: bool,
    /// Waiting subscribers by waiter id, in the order they started waiting.
    waiters: Vec<(u64, Waker)>,
    next_waiter: u64,
}

struct Shared<T>(Mutex<Inner<T>>);

/// The sending side: one per record.
pub struct Feed<T>(Arc<Shared<T>>);

/// A subscriber: sees the latest value, and waits for the next change.
pub struct Subscriber<T> {
    shared: Arc<Shared<T>>,
    seen: u64,
}

/// The feed is gone: no change will come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the record's feed is closed")]
pub struct Closed;

impl<T> Feed<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(Shared(Mutex::new(Inner {
            value: Arc::new(value),
            version: 0,
            closed: false,
            waiters: Vec::new(),
            next_waiter: 0,
        }))))
    }

    pub fn subscribe(&self) -> Subscriber<T> {
        let seen = self.0.0.lock().unwrap().version;
        Subscriber {
            shared: self.0.clone(),
            seen,
        }
    }

    pub fn borrow(&self) -> Arc<T> {
        self.0.0.lock().unwrap().value.clone()
    }

    /// Changes the value in place; subscribers are woken when `modify` says it changed.
    pub fn send_if_modified(&self, modify: impl FnOnce(&mut T) -> bool) -> bool
    where
        T: Clone,
    {
        let woken = {
            let mut inner = self.0.0.lock().unwrap();
            if !modify(Arc::make_mut(&mut inner.value)) {
                return false;
            }
            inner.version += 1;
            std::mem::take(&mut inner.waiters)
        };
        for (_, w) in woken {
            w.wake();
        }
        true
    }
}

impl<T> Drop for Feed<T> {
    fn drop(&mut self) {
        let woken = {
            let mut inner = self.0.0.lock().unwrap();
            inner.closed = true;
            std::mem::take(&mut inner.waiters)
        };
        for (_, w) in woken {
            w.wake();
        }
    }
}

impl<T> Subscriber<T> {
    /// The latest value, marked seen.
    pub fn borrow_and_update(&mut self) -> Arc<T> {
        let inner = self.shared.0.lock().unwrap();
        self.seen = inner.version;
        inner.value.clone()
    }

    pub fn borrow(&self) -> Arc<T> {
        self.shared.0.lock().unwrap().value.clone()
    }

    /// Waits until the value satisfies `ready` (at once if it does), and returns it.
    pub async fn wait_for(&mut self, mut ready: impl FnMut(&T) -> bool) -> Result<Arc<T>, Closed> {
        loop {
            let value = self.borrow_and_update();
            if ready(&value) {
                return Ok(value);
            }
            self.changed().await?;
        }
    }

    /// Waits for a value this subscriber has not seen (at once if there is one), and
    /// marks it seen; `Closed` once the feed is gone.
    pub fn changed(&mut self) -> Changed<'_, T> {
        Changed {
            sub: self,
            waiter: None,
        }
    }
}

impl<T> Clone for Subscriber<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            seen: self.seen,
        }
    }
}

pub struct Changed<'a, T> {
    sub: &'a mut Subscriber<T>,
    /// This future's place among the waiters, once it waits.
    waiter: Option<u64>,
}

impl<T> Future for Changed<'_, T> {
    type Output = Result<(), Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut inner = this.sub.shared.0.lock().unwrap();
        if inner.version != this.sub.seen {
            this.sub.seen = inner.version;
            this.waiter = None;
            return Poll::Ready(Ok(()));
        }
        if inner.closed {
            this.waiter = None;
            return Poll::Ready(Err(Closed));
        }
        let id = match this.waiter {
            Some(id) => id,
            None => {
                let id = inner.next_waiter;
                inner.next_waiter += 1;
                this.waiter = Some(id);
                id
            }
        };
        // Polled again before a change: keep its place, take the newer waker.
        match inner.waiters.iter_mut().find(|(w, _)| *w == id) {
            Some((_, waker)) => waker.clone_from(cx.waker()),
            None => inner.waiters.push((id, cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl<T> Drop for Changed<'_, T> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter {
            let mut inner = self.sub.shared.0.lock().unwrap();
            inner.waiters.retain(|(w, _)| *w != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    #[tokio::test]
    async fn a_change_wakes_waiters_in_the_order_they_started_waiting() {
        let feed = Arc::new(Feed::new(0u32));
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let mut sub = feed.subscribe();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                sub.changed().await.unwrap();
                order.lock().unwrap().push(i);
            }));
            // Each starts waiting before the next is spawned.
            tokio::task::yield_now().await;
        }
        feed.send_if_modified(|v| {
            *v += 1;
            true
        });
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..16).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn subscribers_see_each_value_once_and_learn_when_the_feed_closes() {
        let feed = Feed::new(String::from("a"));
        let mut sub = feed.subscribe();
        // Nothing new yet: `changed` waits.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), sub.changed())
                .await
                .is_err()
        );
        // An unchanged value wakes nobody.
        assert!(!feed.send_if_modified(|_| false));
        feed.send_if_modified(|v| {
            v.push('b');
            true
        });
        sub.changed().await.unwrap();
        assert_eq!(*sub.borrow_and_update(), "ab");
        let late = feed.subscribe();
        assert_eq!(*late.borrow(), "ab");
        drop(feed);
        assert_eq!(sub.changed().await, Err(Closed));
    }
}
