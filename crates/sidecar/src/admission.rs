//! Admission: which requests reach the engine now, which wait for a wake, and the slot
//! each admitted request holds until its response body ends.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use greenthread_ledger::{Feed, Subscriber};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};

use greenthread_api::Priority;

use crate::error::Failure;

/// The queue in front of the engine. Open while the model serves: requests pass at once.
/// Closed otherwise: they wait in arrival order until it opens (all of them are admitted
/// together) or fails them, their deadline passes, or their client goes away.
pub struct Admission {
    queue: Mutex<Queue>,
    max_queue: usize,
    /// Requests in flight; subscribers are woken on 0 ↔ busy alone.
    in_flight_tx: Feed<usize>,
    emptied: Notify,
    depth_gauge: Gauge,
    in_flight_gauge: Gauge,
}

struct Queue {
    open: bool,
    waiters: VecDeque<Waiter>,
    next_id: u64,
    in_flight: usize,
    /// Of those, the ones a preemption cannot stop: they must finish before the model
    /// sleeps.
    must_finish: usize,
    /// When a request last started or ended: the idle clock.
    last_activity: Instant,
    /// Requests that arrived, per minute, for the last [`RECENT_MINUTES`].
    arrivals: Arrivals,
}

/// How far back "recent requests" look, in whole minutes (the current one besides).
pub const RECENT_MINUTES: u64 = 10;

/// Arrivals counted per minute in a ring: constant memory however busy the model.
struct Arrivals {
    since: Instant,
    /// (minute number since `since`, requests that arrived in it).
    ring: [(u64, u32); RECENT_MINUTES as usize + 1],
}

impl Arrivals {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            ring: [(u64::MAX, 0); RECENT_MINUTES as usize + 1],
        }
    }

    fn minute(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.since).as_secs() / 60
    }

    fn count(&mut self, at: Instant) {
        let m = self.minute(at);
        let slot = &mut self.ring[(m % self.ring.len() as u64) as usize];
        if slot.0 != m {
            *slot = (m, 0);
        }
        slot.1 = slot.1.saturating_add(1);
    }

    /// Requests of this minute and the [`RECENT_MINUTES`] before it.
    fn recent(&self, now: Instant) -> usize {
        let m = self.minute(now);
        self.ring
            .iter()
            .filter(|(minute, _)| *minute <= m && m - *minute <= RECENT_MINUTES)
            .map(|(_, n)| *n as usize)
            .sum()
    }
}

struct Waiter {
    id: u64,
    priority: Priority,
    stoppable: bool,
    tx: oneshot::Sender<Result<InFlight, Failure>>,
}

/// How an entry counts.
#[derive(Clone, Copy)]
struct Kind {
    /// A new arrival (a continuation is not: see [`Admission::load`]).
    arrival: bool,
    /// A preemption stops it rather than waits for it.
    stoppable: bool,
}

impl Kind {
    const ANSWER: Kind = Kind {
        arrival: true,
        stoppable: false,
    };
}

/// What a queue does with a newcomer of priority `new`, given the priorities of those
/// waiting (in arrival order) and its capacity `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Queue,
    /// Refused (429): the queue is full of requests at least as important, or it is
    /// past half full and the newcomer is sheddable.
    Refuse,
    /// The queue is full: the waiter at this index (the latest of the lowest priority
    /// below the newcomer's) is refused to make room.
    Evict(usize),
}

/// The queue's rule under pressure: sheddable requests are refused first (from half
/// full on), critical ones last (only when every waiter is critical).
pub fn place(waiting: &[Priority], new: Priority, max: usize) -> Place {
    let depth = waiting.len();
    if new == Priority::Sheddable && depth >= max.div_ceil(2) {
        return Place::Refuse;
    }
    if depth < max {
        return Place::Queue;
    }
    let lowest = waiting.iter().copied().min().filter(|p| *p < new);
    match lowest {
        Some(p) => Place::Evict(
            waiting
                .iter()
                .rposition(|w| *w == p)
                .expect("the minimum is there"),
        ),
        None => Place::Refuse,
    }
}

/// What [`Admission::enter`] did with a request.
pub enum Entry {
    Admitted(InFlight),
    Queued(Ticket),
}

/// What the sidecar reports of its traffic ([`Admission::traffic`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Requests in flight.
    pub in_flight: usize,
    /// New requests (not continuations) lately, queued ones included, as [`Admission::load`]
    /// counts them.
    pub recent: usize,
    /// Of those in flight, the ones a preemption cannot stop (admitted by
    /// [`Admission::enter`] or [`Admission::enter_continuation`]): what it would wait for.
    pub must_finish: usize,
}

/// How a request enters the admission: [`Admission::enter`],
/// [`Admission::enter_stoppable`] or [`Admission::enter_continuation`].
pub type Enter = fn(&Arc<Admission>, Priority) -> Result<Entry, QueueFull>;

/// The queue is full (or, for a sheddable request, past half full).
#[derive(Debug, Clone, Copy)]
pub struct QueueFull {
    pub depth: usize,
    pub priority: Priority,
}

/// How a wait in the queue ended without a slot.
pub enum Waited {
    Failed(Failure),
    Deadline,
}

/// An admitted request's slot at the engine; released (and the idle clock restarted)
/// when dropped, i.e. when the response body has been sent or abandoned.
pub struct InFlight {
    admission: Arc<Admission>,
    stoppable: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.admission;
        let mut q = a.queue.lock().unwrap();
        q.in_flight -= 1;
        if !self.stoppable {
            q.must_finish -= 1;
        }
        q.last_activity = Instant::now();
        a.set_in_flight(q.in_flight);
    }
}

/// A place in the queue; leaving it (deadline, client gone) removes the waiter.
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    rx: Option<oneshot::Receiver<Result<InFlight, Failure>>>,
}

impl Ticket {
    /// Waits for a slot at most `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Result<InFlight, Waited> {
        let rx = self.rx.take().expect("a ticket is waited on once");
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(slot))) => Ok(slot),
            Ok(Ok(Err(failure))) => Err(Waited::Failed(failure)),
            // The admission was dropped with the waiter in it.
            Ok(Err(_)) => Err(Waited::Failed(Failure::ShuttingDown)),
            Err(_) => Err(Waited::Deadline),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        let mut q = a.queue.lock().unwrap();
        if let Some(pos) = q.waiters.iter().position(|w| w.id == self.id) {
            q.waiters.remove(pos);
            a.depth_gauge.set(q.waiters.len() as i64);
            if q.waiters.is_empty() {
                a.emptied.notify_waiters();
            }
        }
    }
}

impl Admission {
    pub fn new(max_queue: usize, depth_gauge: Gauge, in_flight_gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue {
                open: false,
                waiters: VecDeque::new(),
                next_id: 0,
                in_flight: 0,
                must_finish: 0,
                last_activity: Instant::now(),
                arrivals: Arrivals::new(),
            }),
            max_queue,
            in_flight_tx: Feed::new(0),
            emptied: Notify::new(),
            depth_gauge,
            in_flight_gauge,
        })
    }

    /// Admits a request at once when open, queues it otherwise (see [`place`]). In
    /// flight, it counts among those a preemption must wait for ([`Traffic::must_finish`]).
    pub fn enter(self: &Arc<Self>, priority: Priority) -> Result<Entry, QueueFull> {
        self.enter_as(priority, Kind::ANSWER)
    }

    /// [`Admission::enter`] for a request that a preemption stops (the first leg of an
    /// answer that can be continued) rather than waits for.
    pub fn enter_stoppable(self: &Arc<Self>, priority: Priority) -> Result<Entry, QueueFull> {
        self.enter_as(
            priority,
            Kind {
                stoppable: true,
                ..Kind::ANSWER
            },
        )
    }

    /// [`Admission::enter`] for the continuation of an answer already under way: it
    /// queues and is admitted like any request but is no new arrival (see
    /// [`Admission::load`]).
    pub fn enter_continuation(self: &Arc<Self>, priority: Priority) -> Result<Entry, QueueFull> {
        self.enter_as(
            priority,
            Kind {
                arrival: false,
                ..Kind::ANSWER
            },
        )
    }

    fn enter_as(self: &Arc<Self>, priority: Priority, kind: Kind) -> Result<Entry, QueueFull> {
        let mut q = self.queue.lock().unwrap();
        if kind.arrival {
            q.arrivals.count(Instant::now());
        }
        if q.open {
            return Ok(Entry::Admitted(self.admit_locked(&mut q, kind.stoppable)));
        }
        let waiting: Vec<Priority> = q.waiters.iter().map(|w| w.priority).collect();
        match place(&waiting, priority, self.max_queue) {
            Place::Queue => {}
            Place::Refuse => {
                return Err(QueueFull {
                    depth: q.waiters.len(),
                    priority,
                });
            }
            Place::Evict(i) => {
                let w = q.waiters.remove(i).expect("place names a waiter");
                let _ = w.tx.send(Err(Failure::Shed(w.priority)));
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = q.next_id;
        q.next_id += 1;
        q.waiters.push_back(Waiter {
            id,
            priority,
            stoppable: kind.stoppable,
            tx,
        });
        self.depth_gauge.set(q.waiters.len() as i64);
        Ok(Entry::Queued(Ticket {
            admission: self.clone(),
            id,
            rx: Some(rx),
        }))
    }

    fn admit_locked(self: &Arc<Self>, q: &mut Queue, stoppable: bool) -> InFlight {
        q.in_flight += 1;
        if !stoppable {
            q.must_finish += 1;
        }
        q.last_activity = Instant::now();
        self.set_in_flight(q.in_flight);
        InFlight {
            admission: self.clone(),
            stoppable,
        }
    }

    fn set_in_flight(&self, n: usize) {
        self.in_flight_gauge.set(n as i64);
        // Watchers only care whether anything is in flight: wake them on 0 ↔ busy
        // alone, not on every request.
        self.in_flight_tx.send_if_modified(|current| {
            let crossed = (*current == 0) != (n == 0);
            *current = n;
            crossed
        });
    }

    /// The model serves: admit every waiter, the most important first and in arrival
    /// order among equals, and newcomers at once.
    pub fn open(self: &Arc<Self>) {
        let mut q = self.queue.lock().unwrap();
        q.open = true;
        q.last_activity = Instant::now();
        q.waiters
            .make_contiguous()
            .sort_by_key(|w| (std::cmp::Reverse(w.priority), w.id));
        while let Some(w) = q.waiters.pop_front() {
            let slot = self.admit_locked(&mut q, w.stoppable);
            // A waiter that left drops its slot with the unsent value.
            let _ = w.tx.send(Ok(slot));
        }
        self.depth_gauge.set(0);
    }

    /// The barrier: newcomers wait for the next wake.
    pub fn close(&self) {
        self.queue.lock().unwrap().open = false;
    }

    /// Every waiter gets `why` as its answer.
    pub fn fail_all(&self, why: &Failure) {
        let mut q = self.queue.lock().unwrap();
        while let Some(w) = q.waiters.pop_front() {
            let _ = w.tx.send(Err(why.clone()));
        }
        self.depth_gauge.set(0);
        self.emptied.notify_waiters();
    }

    /// The idle clock restarts now (a boot or a wake ended).
    pub fn touch(&self) {
        self.queue.lock().unwrap().last_activity = Instant::now();
    }

    pub fn has_waiters(&self) -> bool {
        !self.queue.lock().unwrap().waiters.is_empty()
    }

    /// Resolves once nobody waits (at once if nobody does).
    pub async fn until_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the check, so that an emptying in between counts.
            emptied.as_mut().enable();
            if !self.has_waiters() {
                return;
            }
            emptied.await;
        }
    }

    /// When a request last started or ended, and whether any is in flight or waiting.
    pub fn activity(&self) -> (Instant, bool) {
        let q = self.queue.lock().unwrap();
        (q.last_activity, q.in_flight > 0 || !q.waiters.is_empty())
    }

    /// Requests in flight, and requests that arrived in the last [`RECENT_MINUTES`]: what
    /// the ledger is told so that preemption spares the models that would be missed most.
    pub fn load(&self) -> (usize, usize) {
        let t = self.traffic();
        (t.in_flight, t.recent)
    }

    /// Wakes when requests start being in flight and when none is any more.
    pub fn busy_changes(&self) -> Subscriber<usize> {
        self.in_flight_tx.subscribe()
    }

    /// [`Admission::load`] and the requests in flight that a preemption cannot stop, as
    /// one snapshot (taken apart, the two could disagree by a request).
    pub fn traffic(&self) -> Traffic {
        let q = self.queue.lock().unwrap();
        Traffic {
            in_flight: q.in_flight,
            recent: q.arrivals.recent(Instant::now()),
            must_finish: q.must_finish,
        }
    }

    /// (waiting, in flight).
    pub fn counts(&self) -> (usize, usize) {
        let q = self.queue.lock().unwrap();
        (q.waiters.len(), q.in_flight)
    }

    /// Waits until nothing is in flight, at most `timeout`; whether it drained.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let mut in_flight = self.in_flight_tx.subscribe();
        tokio::time::timeout(timeout, in_flight.wait_for(|n: &usize| *n == 0))
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize) -> Arc<Admission> {
        Admission::new(max, Gauge::default(), Gauge::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_continuation_is_admitted_and_queued_but_is_no_new_arrival() {
        let a = admission(8);
        a.open();
        let slot = a.enter_continuation(Priority::Standard);
        assert!(matches!(slot, Ok(Entry::Admitted(_))));
        assert_eq!(a.load(), (1, 0), "in flight, not a recent request");
        drop(slot);
        drop(a.enter(Priority::Standard));
        assert_eq!(a.load(), (0, 1));
        // Closed, it waits its turn like any request, still uncounted.
        a.close();
        let t = a.enter_continuation(Priority::Standard);
        assert!(matches!(t, Ok(Entry::Queued(_))));
        assert_eq!(a.counts().0, 1, "queued");
        assert_eq!(a.load().1, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn recent_requests_are_those_of_the_last_ten_minutes() {
        let a = admission(8);
        a.open();
        for _ in 0..3 {
            drop(a.enter(Priority::Standard));
        }
        tokio::time::advance(Duration::from_secs(5 * 60)).await;
        drop(a.enter(Priority::Standard));
        assert_eq!(a.load(), (0, 4));
        // Eleven minutes on, the first three are out; sixteen on, all are.
        tokio::time::advance(Duration::from_secs(6 * 60)).await;
        assert_eq!(a.load().1, 1);
        tokio::time::advance(Duration::from_secs(5 * 60)).await;
        assert_eq!(a.load().1, 0);
        // A slot of the ring reused a lap later starts from zero.
        drop(a.enter(Priority::Standard));
        assert_eq!(a.load().1, 1);
    }

    /// What a preemption would wait for: answers that must finish and continuations,
    /// not first legs it stops, admitted at once or from the queue.
    #[tokio::test(start_paused = true)]
    async fn the_traffic_counts_what_a_preemption_must_wait_for() {
        let a = admission(8);
        let traffic = |in_flight, recent, must_finish| Traffic {
            in_flight,
            recent,
            must_finish,
        };
        let stopped_later = queued(a.enter_stoppable(Priority::Standard));
        let finished_later = queued(a.enter(Priority::Standard));
        assert_eq!(a.traffic(), traffic(0, 2, 0), "queued: not in flight yet");
        a.open();
        let s1 = stopped_later
            .wait(Duration::from_secs(1))
            .await
            .ok()
            .unwrap();
        let s2 = finished_later
            .wait(Duration::from_secs(1))
            .await
            .ok()
            .unwrap();
        assert_eq!(a.traffic(), traffic(2, 2, 1));
        let answer = a.enter(Priority::Standard);
        let continuation = a.enter_continuation(Priority::Standard);
        let first_leg = a.enter_stoppable(Priority::Standard);
        assert_eq!(a.traffic(), traffic(5, 4, 3));
        drop((answer, s2));
        assert_eq!(a.traffic(), traffic(3, 4, 1));
        drop(continuation);
        assert_eq!(
            a.traffic(),
            traffic(2, 4, 0),
            "only stoppable first legs left"
        );
        drop((first_leg, s1));
        assert_eq!(a.traffic(), traffic(0, 4, 0));
    }

    fn queued(e: Result<Entry, QueueFull>) -> Ticket {
        match e {
            Ok(Entry::Queued(t)) => t,
            _ => panic!("expected to be queued"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_admitted_together_when_it_opens_and_newcomers_pass() {
        let a = admission(8);
        let t1 = queued(a.enter(Priority::Standard));
        let t2 = queued(a.enter(Priority::Standard));
        assert_eq!(a.counts(), (2, 0));
        a.open();
        let s1 = t1.wait(Duration::from_secs(1)).await.ok().unwrap();
        let s2 = t2.wait(Duration::from_secs(1)).await.ok().unwrap();
        assert_eq!(a.counts(), (0, 2));
        assert!(matches!(
            a.enter(Priority::Standard),
            Ok(Entry::Admitted(_))
        ));
        drop((s1, s2));
        assert_eq!(a.counts(), (0, 0));
        assert!(a.drained(Duration::ZERO).await);
    }

    /// The README's claim: queued requests go to the engine in the order they came.
    #[tokio::test(start_paused = true)]
    async fn waiters_are_released_in_arrival_order() {
        let a = admission(8);
        let tickets: Vec<Ticket> = (0..5)
            .map(|_| queued(a.enter(Priority::Standard)))
            .collect();
        let order = Arc::new(Mutex::new(Vec::new()));
        // Spawned last-first, so that spawn order cannot pass for arrival order.
        let mut tasks = Vec::new();
        for (i, t) in tickets.into_iter().enumerate().rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let slot = t.wait(Duration::from_secs(1)).await.ok().unwrap();
                order.lock().unwrap().push(i);
                slot
            }));
        }
        tokio::task::yield_now().await;
        a.open();
        for t in tasks {
            drop(t.await.unwrap());
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_a_leaving_waiter_frees_its_place() {
        let a = admission(1);
        let t = queued(a.enter(Priority::Standard));
        assert!(matches!(
            a.enter(Priority::Standard),
            Err(QueueFull { depth: 1, .. })
        ));
        let emptied = tokio::spawn({
            let a = a.clone();
            async move { a.until_empty().await }
        });
        assert!(matches!(
            t.wait(Duration::from_secs(5)).await,
            Err(Waited::Deadline)
        ));
        emptied.await.unwrap();
        assert!(!a.has_waiters());
        let t = queued(a.enter(Priority::Standard));
        a.fail_all(&Failure::ShuttingDown);
        assert!(matches!(
            t.wait(Duration::from_secs(5)).await,
            Err(Waited::Failed(Failure::ShuttingDown))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_is_held_until_dropped_and_drain_waits_for_it() {
        let a = admission(8);
        a.open();
        let Ok(Entry::Admitted(slot)) = a.enter(Priority::Standard) else {
            panic!("open admits at once")
        };
        a.close();
        assert!(!a.drained(Duration::from_secs(1)).await);
        let (_, busy) = a.activity();
        assert!(busy);
        drop(slot);
        assert!(a.drained(Duration::from_secs(1)).await);
        assert!(matches!(a.enter(Priority::Standard), Ok(Entry::Queued(_))));
    }

    #[test]
    fn under_pressure_sheddable_requests_go_first_and_critical_ones_last() {
        use Priority::{Critical as C, Sheddable as D, Standard as S};
        // (waiting, newcomer, capacity) → place
        let table: &[(&[Priority], Priority, usize, Place)] = &[
            (&[], D, 4, Place::Queue),
            (&[S], D, 4, Place::Queue),
            // From half full on, a sheddable request is refused...
            (&[S, S], D, 4, Place::Refuse),
            (&[S], D, 1, Place::Refuse),
            // ...the others queue until it is full...
            (&[S, S, S], S, 4, Place::Queue),
            // ...then take the place of the latest of the least important below them.
            (&[D, S, D, S], S, 4, Place::Evict(2)),
            (&[S, C, S, C], C, 4, Place::Evict(2)),
            (&[D, S, C, C], C, 4, Place::Evict(0)),
            // Nobody below: refused.
            (&[S, S, C, S], S, 4, Place::Refuse),
            (&[C, C], C, 2, Place::Refuse),
        ];
        for (waiting, new, max, want) in table {
            assert_eq!(
                place(waiting, *new, *max),
                *want,
                "{waiting:?} + {new:?} of {max}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_most_important_are_admitted_first_and_an_evicted_waiter_is_told_why() {
        let a = admission(3);
        let low = queued(a.enter(Priority::Standard));
        let mid = queued(a.enter(Priority::Standard));
        let top = queued(a.enter(Priority::Critical));
        // Full: a critical newcomer takes the latest standard one's place.
        let top2 = queued(a.enter(Priority::Critical));
        assert!(matches!(
            mid.wait(Duration::from_secs(1)).await,
            Err(Waited::Failed(Failure::Shed(Priority::Standard)))
        ));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, t) in [("low", low), ("top", top), ("top2", top2)] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let slot = t.wait(Duration::from_secs(1)).await.ok().unwrap();
                order.lock().unwrap().push(name);
                slot
            }));
        }
        tokio::task::yield_now().await;
        a.open();
        for t in tasks {
            drop(t.await.unwrap());
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["top", "top2", "low"]);
    }
}
