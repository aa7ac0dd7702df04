//! Model check of the sharded `DropBook` against a single-lock reference (sequential: every answer and every
//! snapshot must match exactly), and a concurrent check that hammers one book from several threads while another
//! thread snapshots it (conservation, member limits, and exactly-once transitions must hold throughout).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first unexpected refusal"
)]

use engine::core::{
    Counts, DropBook, DropParams, HoldState, HoldView, ReleaseReason, ReserveRejection,
    TransitionError,
};
use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Barrier;
use uuid::Uuid;

const HOLD_MS: i64 = 100;
const T0: i64 = 1_700_000_000_000;

/// The reference: the same contract, written the obvious way, under one lock.
struct Reference {
    params: DropParams,
    state: Mutex<Model>,
}

#[derive(Default)]
struct Model {
    available: u32,
    held: u32,
    paid: u32,
    /// Mirrors the book's flag: set by a reservation that reaches the stock with none left, cleared by a release.
    sold_out: bool,
    holds: BTreeMap<Uuid, HoldView>,
    members: HashMap<Uuid, u32>,
}

impl Model {
    fn release(&mut self, hold_id: Uuid, reason: ReleaseReason) -> HoldView {
        let hold = self.holds.get_mut(&hold_id).unwrap();
        hold.state = HoldState::Released(reason);
        let hold = *hold;
        self.held -= hold.quantity;
        self.available += hold.quantity;
        *self.members.get_mut(&hold.member).unwrap() -= hold.quantity;
        self.sold_out = false;
        hold
    }

    fn refusal(state: HoldState) -> TransitionError {
        match state {
            HoldState::Held => TransitionError::NotPaying,
            HoldState::Paying => TransitionError::PaymentInFlight,
            HoldState::Paid => TransitionError::AlreadyPaid,
            HoldState::Released(reason) => TransitionError::AlreadyReleased(reason),
        }
    }
}

/// What both implementations answer, so one driver can run either.
trait Book {
    /// The book makes the hold's id from `hold_id` (a seed); the reference takes it as the id, so the driver hands
    /// it the id the book made.
    fn reserve(
        &self,
        hold_id: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> Result<HoldView, ReserveRejection>;
    fn begin_payment(
        &self,
        hold_id: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> Result<HoldView, TransitionError>;
    fn complete_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError>;
    fn abort_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError>;
    fn decline_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError>;
    fn cancel(&self, hold_id: Uuid, member: Uuid) -> Result<HoldView, TransitionError>;
    /// Released holds, sorted by id (the book's order depends on its shards).
    fn reap(&self, now_ms: i64) -> Vec<HoldView>;
    fn hold(&self, hold_id: Uuid) -> Option<HoldView>;
    fn counts(&self) -> Counts;
    fn is_sold_out(&self) -> bool;
    fn member_units(&self, member: Uuid) -> u32;
}

impl Book for DropBook {
    fn reserve(
        &self,
        hold_id: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> Result<HoldView, ReserveRejection> {
        DropBook::reserve(self, hold_id, member, quantity, now_ms)
    }
    fn begin_payment(
        &self,
        hold_id: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> Result<HoldView, TransitionError> {
        DropBook::begin_payment(self, hold_id, member, now_ms)
    }
    fn complete_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        DropBook::complete_payment(self, hold_id)
    }
    fn abort_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        DropBook::abort_payment(self, hold_id)
    }
    fn decline_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        DropBook::decline_payment(self, hold_id)
    }
    fn cancel(&self, hold_id: Uuid, member: Uuid) -> Result<HoldView, TransitionError> {
        DropBook::cancel(self, hold_id, member)
    }
    fn reap(&self, now_ms: i64) -> Vec<HoldView> {
        let mut out = Vec::new();
        let released = DropBook::reap(self, now_ms, &mut out);
        assert_eq!(released, out.len());
        out.sort_by_key(|hold| hold.id);
        out
    }
    fn hold(&self, hold_id: Uuid) -> Option<HoldView> {
        DropBook::hold(self, hold_id)
    }
    fn counts(&self) -> Counts {
        DropBook::counts(self)
    }
    fn is_sold_out(&self) -> bool {
        DropBook::is_sold_out(self)
    }
    fn member_units(&self, member: Uuid) -> u32 {
        DropBook::member_units(self, member)
    }
}

impl Reference {
    fn new(params: DropParams) -> Self {
        let model = Model {
            available: params.stock,
            sold_out: params.stock == 0,
            ..Model::default()
        };
        Self {
            params,
            state: Mutex::new(model),
        }
    }

    /// A transition of an existing hold: `decide` returns the next state or the refusal.
    fn transition(
        &self,
        hold_id: Uuid,
        decide: impl FnOnce(&HoldView) -> Result<HoldState, TransitionError>,
    ) -> Result<HoldView, TransitionError> {
        let mut model = self.state.lock();
        let hold = *model.holds.get(&hold_id).ok_or(TransitionError::NotFound)?;
        match decide(&hold)? {
            HoldState::Released(reason) => Ok(model.release(hold_id, reason)),
            HoldState::Paid => {
                model.held -= hold.quantity;
                model.paid += hold.quantity;
                let hold = model.holds.get_mut(&hold_id).unwrap();
                hold.state = HoldState::Paid;
                Ok(*hold)
            }
            to => {
                let hold = model.holds.get_mut(&hold_id).unwrap();
                hold.state = to;
                Ok(*hold)
            }
        }
    }
}

impl Book for Reference {
    fn reserve(
        &self,
        hold_id: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> Result<HoldView, ReserveRejection> {
        if quantity == 0 || quantity > self.params.per_member_limit {
            return Err(ReserveRejection::InvalidQuantity);
        }
        let mut model = self.state.lock();
        if model.sold_out {
            return Err(ReserveRejection::SoldOut);
        }
        if model.members.get(&member).copied().unwrap_or(0) + quantity
            > self.params.per_member_limit
        {
            return Err(ReserveRejection::LimitExceeded);
        }
        if model.available < quantity {
            model.sold_out = model.available == 0;
            return Err(ReserveRejection::SoldOut);
        }
        assert!(
            !model.holds.contains_key(&hold_id),
            "the book made an id twice"
        );
        let hold = HoldView {
            id: hold_id,
            member,
            quantity,
            state: HoldState::Held,
            created_at_ms: now_ms,
            expires_at_ms: now_ms + self.params.hold_ms,
        };
        model.holds.insert(hold_id, hold);
        model.available -= quantity;
        model.held += quantity;
        *model.members.entry(member).or_insert(0) += quantity;
        Ok(hold)
    }

    fn begin_payment(
        &self,
        hold_id: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> Result<HoldView, TransitionError> {
        let hold = self.transition(hold_id, |hold| {
            if hold.member != member {
                return Err(TransitionError::NotOwner);
            }
            match hold.state {
                HoldState::Held if hold.expires_at_ms <= now_ms => {
                    Ok(HoldState::Released(ReleaseReason::Expired))
                }
                HoldState::Held => Ok(HoldState::Paying),
                other => Err(Model::refusal(other)),
            }
        })?;
        if hold.state == HoldState::Released(ReleaseReason::Expired) {
            return Err(TransitionError::Expired);
        }
        Ok(hold)
    }

    fn complete_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        self.transition(hold_id, |hold| match hold.state {
            HoldState::Paying => Ok(HoldState::Paid),
            other => Err(Model::refusal(other)),
        })
    }

    fn abort_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        self.transition(hold_id, |hold| match hold.state {
            HoldState::Paying => Ok(HoldState::Held),
            other => Err(Model::refusal(other)),
        })
    }

    fn decline_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        self.transition(hold_id, |hold| match hold.state {
            HoldState::Paying => Ok(HoldState::Released(ReleaseReason::PaymentDeclined)),
            other => Err(Model::refusal(other)),
        })
    }

    fn cancel(&self, hold_id: Uuid, member: Uuid) -> Result<HoldView, TransitionError> {
        self.transition(hold_id, |hold| {
            if hold.member != member {
                return Err(TransitionError::NotOwner);
            }
            match hold.state {
                HoldState::Held => Ok(HoldState::Released(ReleaseReason::Cancelled)),
                other => Err(Model::refusal(other)),
            }
        })
    }

    fn reap(&self, now_ms: i64) -> Vec<HoldView> {
        let mut model = self.state.lock();
        let due: Vec<Uuid> = model
            .holds
            .values()
            .filter(|hold| hold.state == HoldState::Held && hold.expires_at_ms <= now_ms)
            .map(|hold| hold.id)
            .collect();
        due.into_iter()
            .map(|hold_id| model.release(hold_id, ReleaseReason::Expired))
            .collect()
    }

    fn hold(&self, hold_id: Uuid) -> Option<HoldView> {
        self.state.lock().holds.get(&hold_id).copied()
    }

    fn counts(&self) -> Counts {
        let model = self.state.lock();
        Counts {
            stock: self.params.stock,
            available: model.available,
            held: model.held,
            paid: model.paid,
        }
    }

    fn is_sold_out(&self) -> bool {
        self.state.lock().sold_out
    }

    fn member_units(&self, member: Uuid) -> u32 {
        self.state.lock().members.get(&member).copied().unwrap_or(0)
    }
}

/// Which hold an operation is about: a fresh id, or one of the holds created so far.
#[derive(Clone, Debug)]
enum HoldRef {
    Fresh,
    Known(Index),
}

/// Which member an operation acts as: the hold's owner, or one of the test's members.
#[derive(Clone, Debug)]
enum Who {
    Owner,
    Member(Index),
}

impl Who {
    fn resolve(&self, members: &[Uuid], owner: Uuid) -> Uuid {
        match self {
            Who::Owner => owner,
            Who::Member(index) => *index.get(members),
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        /// The seed of the new hold's id: fresh, or a known hold's id (the book makes a new id from either).
        hold: HoldRef,
        member: Index,
        quantity: u32,
    },
    BeginPayment {
        hold: HoldRef,
        who: Who,
    },
    CompletePayment(HoldRef),
    AbortPayment(HoldRef),
    DeclinePayment(HoldRef),
    Cancel {
        hold: HoldRef,
        who: Who,
    },
    Reap,
    Advance(i64),
}

fn hold_ref(fresh_weight: u32) -> impl Strategy<Value = HoldRef> {
    prop_oneof![
        fresh_weight => Just(HoldRef::Fresh),
        10 => any::<Index>().prop_map(HoldRef::Known),
    ]
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![8 => Just(Who::Owner), 2 => any::<Index>().prop_map(Who::Member)]
}

/// Mostly 1..=`max_quantity` (valid when within the limit), sometimes zero or above any limit.
fn quantity(max_quantity: u32) -> impl Strategy<Value = u32> {
    prop_oneof![10 => Just(1), 6 => 2..=max_quantity, 1 => Just(0), 1 => Just(max_quantity + 1)]
}

fn op(max_quantity: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (hold_ref(9), any::<Index>(), quantity(max_quantity))
            .prop_map(|(hold, member, quantity)| Op::Reserve { hold, member, quantity }),
        3 => (hold_ref(1), who()).prop_map(|(hold, who)| Op::BeginPayment { hold, who }),
        2 => hold_ref(1).prop_map(Op::CompletePayment),
        1 => hold_ref(1).prop_map(Op::AbortPayment),
        1 => hold_ref(1).prop_map(Op::DeclinePayment),
        2 => (hold_ref(1), who()).prop_map(|(hold, who)| Op::Cancel { hold, who }),
        1 => Just(Op::Reap),
        2 => (0..=HOLD_MS * 3 / 2).prop_map(Op::Advance),
    ]
}

fn params(stock: RangeInclusive<u32>) -> impl Strategy<Value = DropParams> {
    (stock, 1u32..=3, prop::sample::select(vec![1usize, 2, 4, 8])).prop_map(
        |(stock, per_member_limit, shards)| DropParams {
            stock,
            per_member_limit,
            hold_ms: HOLD_MS,
            shards,
        },
    )
}

/// An operation with its hold and member resolved to ids.
#[derive(Clone, Copy, Debug)]
enum Call {
    Reserve {
        hold_id: Uuid,
        member: Uuid,
        quantity: u32,
    },
    BeginPayment {
        hold_id: Uuid,
        member: Uuid,
    },
    CompletePayment(Uuid),
    AbortPayment(Uuid),
    DeclinePayment(Uuid),
    Cancel {
        hold_id: Uuid,
        member: Uuid,
    },
    Reap,
    Advance(i64),
}

impl Op {
    /// `hold` turns a reference into `(hold id, owner)`.
    fn resolve(&self, members: &[Uuid], mut hold: impl FnMut(&HoldRef) -> (Uuid, Uuid)) -> Call {
        match self {
            Op::Reserve {
                hold: which,
                member,
                quantity,
            } => Call::Reserve {
                hold_id: hold(which).0,
                member: *member.get(members),
                quantity: *quantity,
            },
            Op::BeginPayment { hold: which, who } => {
                let (hold_id, owner) = hold(which);
                Call::BeginPayment {
                    hold_id,
                    member: who.resolve(members, owner),
                }
            }
            Op::CompletePayment(which) => Call::CompletePayment(hold(which).0),
            Op::AbortPayment(which) => Call::AbortPayment(hold(which).0),
            Op::DeclinePayment(which) => Call::DeclinePayment(hold(which).0),
            Op::Cancel { hold: which, who } => {
                let (hold_id, owner) = hold(which);
                Call::Cancel {
                    hold_id,
                    member: who.resolve(members, owner),
                }
            }
            Op::Reap => Call::Reap,
            Op::Advance(ms) => Call::Advance(*ms),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Answer {
    Reserve(Result<HoldView, ReserveRejection>),
    Transition(Result<HoldView, TransitionError>),
    Reaped(Vec<HoldView>),
    /// `Advance` asks the book nothing; the driver moves its clock.
    Clock,
}

impl Call {
    fn ask(&self, book: &dyn Book, now_ms: i64) -> Answer {
        match *self {
            Call::Reserve {
                hold_id,
                member,
                quantity,
            } => Answer::Reserve(book.reserve(hold_id, member, quantity, now_ms)),
            Call::BeginPayment { hold_id, member } => {
                Answer::Transition(book.begin_payment(hold_id, member, now_ms))
            }
            Call::CompletePayment(hold_id) => Answer::Transition(book.complete_payment(hold_id)),
            Call::AbortPayment(hold_id) => Answer::Transition(book.abort_payment(hold_id)),
            Call::DeclinePayment(hold_id) => Answer::Transition(book.decline_payment(hold_id)),
            Call::Cancel { hold_id, member } => Answer::Transition(book.cancel(hold_id, member)),
            Call::Reap => Answer::Reaped(book.reap(now_ms)),
            Call::Advance(_) => Answer::Clock,
        }
    }
}

/// Holds created so far (with their owners), and fresh ids for the rest.
#[derive(Default)]
struct Holds {
    created: Vec<(Uuid, Uuid)>,
    next: u64,
}

impl Holds {
    /// A known hold, or a fresh id (owned by nobody in particular) when none is known yet or `Fresh` is asked for.
    /// Fresh ids differ in the bytes the book keeps (the counter in bytes 8..12) and name small places in the bytes
    /// it writes (the last four: a value below 64 is a low slot on every shard count), so a transition of a fresh
    /// id often names the place of a real hold, which it must not reach.
    fn pick(&mut self, hold: &HoldRef, members: &[Uuid]) -> (Uuid, Uuid) {
        match hold {
            HoldRef::Known(index) if !self.created.is_empty() => *index.get(&self.created),
            _ => {
                self.next += 1;
                let seed = Uuid::from_u64_pair(
                    0x0190_0000_0000_7000,
                    (self.next << 32) | ((self.next.wrapping_mul(0x9E37_79B9) >> 24) % 64),
                );
                (seed, members[0])
            }
        }
    }
}

/// What one worker thread saw of the transitions it made happen.
#[derive(Default)]
struct Seen {
    released: Vec<Uuid>,
    paid: Vec<Uuid>,
}

/// The state shared by the worker threads of one concurrent run.
struct Shared {
    book: DropBook,
    members: Vec<Uuid>,
    holds: Mutex<Holds>,
    now_ms: AtomicI64,
}

impl Shared {
    fn run(&self, op: &Op, seen: &mut Seen) {
        let call = op.resolve(&self.members, |which| {
            self.holds.lock().pick(which, &self.members)
        });
        if let Call::Advance(ms) = call {
            self.now_ms.fetch_add(ms / 4, Ordering::Relaxed);
            // Let another thread in mid-script, so scripts interleave even when there are more threads than cores.
            std::thread::yield_now();
        }
        match (
            call,
            call.ask(&self.book, self.now_ms.load(Ordering::Relaxed)),
        ) {
            (Call::Reserve { member, .. }, Answer::Reserve(Ok(hold))) => {
                self.holds.lock().created.push((hold.id, member));
            }
            (_, Answer::Transition(Ok(hold))) => match hold.state {
                HoldState::Released(_) => seen.released.push(hold.id),
                HoldState::Paid => seen.paid.push(hold.id),
                HoldState::Held | HoldState::Paying => {}
            },
            (
                Call::BeginPayment { hold_id, .. },
                Answer::Transition(Err(TransitionError::Expired)),
            ) => {
                seen.released.push(hold_id);
            }
            (_, Answer::Reaped(holds)) => seen.released.extend(holds.iter().map(|hold| hold.id)),
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every answer and every observable of the sharded book equals the reference's, step by step.
    #[test]
    fn sharded_book_matches_the_single_lock_reference(
        params in params(0..=12),
        members in prop::collection::vec(any::<u128>().prop_map(Uuid::from_u128), 4),
        ops in prop::collection::vec(op(3), 1..80),
    ) {
        let book = DropBook::new(params);
        let reference = Reference::new(params);
        let mut holds = Holds::default();
        let mut now = T0;
        for (step, op) in ops.iter().enumerate() {
            let call = op.resolve(&members, |which| holds.pick(which, &members));
            if let Call::Advance(ms) = call {
                now += ms;
            }
            let ours = call.ask(&book, now);
            // The reference takes the id the book made (or, on a refusal, the seed, which it never records).
            let theirs = match (call, &ours) {
                (Call::Reserve { member, quantity, .. }, Answer::Reserve(Ok(hold))) => {
                    holds.created.push((hold.id, member));
                    Call::Reserve { hold_id: hold.id, member, quantity }.ask(&reference, now)
                }
                _ => call.ask(&reference, now),
            };
            prop_assert_eq!(ours, theirs, "answer to step {} {:?}", step, op);
            prop_assert_eq!(book.counts(), reference.counts(), "counts after step {} {:?}", step, op);
            prop_assert_eq!(book.is_sold_out(), reference.is_sold_out(), "flag after step {} {:?}", step, op);
            for &member in &members {
                prop_assert_eq!(book.member_units(member), reference.member_units(member), "member after step {}", step);
            }
            for &(hold_id, _) in &holds.created {
                prop_assert_eq!(book.hold(hold_id), reference.hold(hold_id), "hold after step {}", step);
            }
        }
    }
}

const WORKERS: usize = 3;

proptest! {
    // Shrinking a run whose outcome depends on the interleaving mostly re-runs it; a few tries are enough.
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 32, ..ProptestConfig::default() })]

    /// Several threads run random operations on one book (sharing members and holds) while a checker snapshots it.
    #[test]
    fn concurrent_operations_conserve_stock_and_limits(
        params in params(2..=12),
        members in prop::collection::vec(any::<u128>().prop_map(Uuid::from_u128), 6),
        scripts in prop::collection::vec(prop::collection::vec(op(3), 500), WORKERS),
    ) {
        let shared = Shared {
            book: DropBook::new(params),
            members,
            holds: Mutex::new(Holds::default()),
            now_ms: AtomicI64::new(T0),
        };
        let done = AtomicBool::new(false);
        let start = Barrier::new(WORKERS + 1);
        let (seen, snapshots) = std::thread::scope(|scope| {
            let checker = scope.spawn(|| {
                start.wait();
                let mut snapshots = 0u64;
                // At least once, and then until the workers are done (on two cores they may finish first).
                while snapshots == 0 || !done.load(Ordering::Acquire) {
                    let counts = shared.book.counts();
                    assert_eq!(counts.available + counts.held + counts.paid, params.stock, "{counts:?}");
                    for &member in &shared.members {
                        let units = shared.book.member_units(member);
                        assert!(units <= params.per_member_limit, "member {member} holds {units}");
                    }
                    snapshots += 1;
                }
                snapshots
            });
            let workers: Vec<_> = scripts
                .iter()
                .map(|script| {
                    let (shared, start) = (&shared, &start);
                    scope.spawn(move || {
                        start.wait();
                        let mut seen = Seen::default();
                        for op in script {
                            shared.run(op, &mut seen);
                        }
                        seen
                    })
                })
                .collect();
            // Joined before unwrapping: a worker that panicked must still stop the checker, or the scope never ends.
            let seen: Vec<_> = workers.into_iter().map(|worker| worker.join()).collect();
            done.store(true, Ordering::Release);
            let snapshots = checker.join().unwrap();
            (seen.into_iter().map(Result::unwrap).collect::<Vec<Seen>>(), snapshots)
        });
        prop_assert!(snapshots > 0);

        // The records add up to the counts, and each transition out of held/paying was reported exactly once.
        let book = &shared.book;
        let holds: Vec<HoldView> = shared.holds.lock().created.iter().map(|&(hold_id, _)| book.hold(hold_id).unwrap()).collect();
        let mut expected = Counts { stock: params.stock, ..Counts::default() };
        let mut units: HashMap<Uuid, u32> = HashMap::new();
        for hold in &holds {
            match hold.state {
                HoldState::Held | HoldState::Paying => expected.held += hold.quantity,
                HoldState::Paid => expected.paid += hold.quantity,
                HoldState::Released(_) => continue,
            }
            *units.entry(hold.member).or_insert(0) += hold.quantity;
        }
        expected.available = params.stock - expected.held - expected.paid;
        prop_assert_eq!(book.counts(), expected);
        for &member in &shared.members {
            prop_assert_eq!(book.member_units(member), units.get(&member).copied().unwrap_or(0));
            prop_assert!(book.member_units(member) <= params.per_member_limit);
        }
        let sorted = |mut ids: Vec<Uuid>| { ids.sort(); ids };
        let released = sorted(seen.iter().flat_map(|seen| seen.released.iter().copied()).collect());
        let paid = sorted(seen.iter().flat_map(|seen| seen.paid.iter().copied()).collect());
        let in_state = |wanted: fn(HoldState) -> bool| {
            sorted(holds.iter().filter(|hold| wanted(hold.state)).map(|hold| hold.id).collect())
        };
        prop_assert_eq!(released, in_state(|state| matches!(state, HoldState::Released(_))));
        prop_assert_eq!(paid, in_state(|state| state == HoldState::Paid));

        // No undersell once quiet: abort what is in flight, expire everything, and all unpaid stock is back on sale.
        for hold in &holds {
            if hold.state == HoldState::Paying {
                book.abort_payment(hold.id).unwrap();
            }
        }
        let mut out = Vec::new();
        book.reap(i64::MAX, &mut out);
        let after = book.counts();
        prop_assert_eq!(after, Counts { stock: params.stock, available: params.stock - expected.paid, held: 0, paid: expected.paid });
        prop_assert!(!(book.is_sold_out() && after.available > 0), "flag set with {:?}", after);
        for &member in &shared.members {
            let paid_units: u32 = holds.iter().filter(|hold| hold.member == member && hold.state == HoldState::Paid).map(|hold| hold.quantity).sum();
            prop_assert_eq!(book.member_units(member), paid_units);
        }
    }
}
