//! Linearizability checking for recorded histories of a key-value store.
//!
//! # Model
//!
//! The store is a map from `String` keys to `String` values in which every key
//! behaves as an independent read/write register that starts out absent.
//! Strings rather than bytes keep failure reports readable; callers storing
//! binary data can hex-encode it. The supported operations are [`Op::Put`],
//! [`Op::Get`], [`Op::Cas`] and [`Op::Delete`].
//!
//! A [`History`] records, for every operation, the client that issued it, its
//! invocation and response times, and its [`Outcome`]. Times are `u64` readings
//! of any monotonic clock (nanoseconds, say); only their order matters. Two
//! operations whose intervals merely touch (one responds at the instant the
//! other is invoked) are treated as concurrent, so a coarse clock can hide a
//! violation but never invent one.
//!
//! An operation whose fate the client could not learn (timeout, connection
//! reset, crash) is recorded with [`Outcome::Unknown`], or simply never
//! completed. It may have taken effect at any instant after its invocation, or
//! never, so it is modelled as an operation with an infinite response time and
//! an unconstrained result. Unknown reads constrain nothing and are ignored.
//! An operation known *not* to have executed (rejected before it was sent)
//! must not be recorded at all.
//!
//! # Algorithm
//!
//! Linearizability is compositional (Herlihy & Wing's locality property), so a
//! map of independent registers is linearizable iff every key's sub-history
//! is. [`check`] therefore checks one key at a time, which keeps each search
//! small. Each key is checked with the Wing & Gong algorithm as improved by
//! Lowe and used by Porcupine and Knossos: a depth-first search over the
//! time-ordered list of call and return events that linearizes pending
//! operations one by one, backtracks when it reaches the return of an
//! operation it has not placed yet, and never revisits a search state (set of
//! linearized operations, register value) it has already explored.
//!
//! Operations with unknown outcomes are the expensive part, since each may be
//! left out or placed anywhere after its invocation. Before the search, one
//! that must have taken effect (the only write of a value that a completed
//! operation observed) becomes an ordinary operation and one that cannot
//! matter is dropped; during it, interchangeable ones are tried once and
//! states that merely used up more of them are pruned.
//!
//! Linearizable histories of thousands of operations per key typically check
//! in tens of milliseconds. Refuting a violation means exhausting every
//! ordering of what precedes it, which is far costlier late in a long history
//! with many unknown outcomes (a read of a value nobody wrote is caught
//! without search, though). The search is exponential in the worst case, so
//! it runs under a [`Budget`] and answers [`Verdict::Inconclusive`] rather
//! than running away; it never reports a violation it has not proven.
//!
//! # Example
//!
//! ```
//! use lodge_test_support::history::{check, Budget, History, Op, Outcome, Verdict};
//!
//! let mut history = History::new();
//! let put = |key: &str, value: &str| Op::Put {
//!     key: key.into(),
//!     value: value.into(),
//! };
//! let get = |key: &str| Op::Get { key: key.into() };
//! history.record(1, put("x", "1"), 0, Outcome::Done, 10).unwrap();
//! history.record(1, put("x", "2"), 20, Outcome::Done, 30).unwrap();
//! // Client 2 reads the overwritten value after the second put completed.
//! history
//!     .record(2, get("x"), 40, Outcome::Read(Some("1".into())), 50)
//!     .unwrap();
//! match check(&history, Budget::default()) {
//!     Verdict::NotLinearizable { key, witness, .. } => {
//!         assert_eq!(key, "x");
//!         assert_eq!(witness.len(), 3);
//!     }
//!     other => panic!("expected a violation, got {other}"),
//! }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

/// Identifies the client (process, thread, connection) that issued an operation.
pub type ClientId = u64;

/// Handle to an operation recorded in a [`History`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(usize);

impl OpId {
    /// Position of the operation in the history, in recording order.
    #[must_use]
    pub fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// An operation on the key-value store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Sets `key` to `value`; completes with [`Outcome::Done`].
    Put {
        /// Key written.
        key: String,
        /// Value stored.
        value: String,
    },
    /// Reads `key`; completes with [`Outcome::Read`].
    Get {
        /// Key read.
        key: String,
    },
    /// Sets `key` to `new` iff its current value equals `expect`; completes
    /// with [`Outcome::Cas`].
    Cas {
        /// Key compared and written.
        key: String,
        /// Required current value; `None` requires the key to be absent.
        expect: Option<String>,
        /// Value stored on success.
        new: String,
    },
    /// Removes `key`; completes with [`Outcome::Done`].
    Delete {
        /// Key removed.
        key: String,
    },
}

impl Op {
    /// The key this operation touches.
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Cas { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// What the client learned about an operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A `Put` or `Delete` was acknowledged.
    Done,
    /// A `Get` observed this value; `None` means the key was absent.
    Read(Option<String>),
    /// A `Cas` reported whether it swapped.
    Cas(bool),
    /// The client cannot tell whether the operation took effect.
    Unknown,
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Client that issued the operation; used only in reports.
    pub client: ClientId,
    /// The operation itself.
    pub op: Op,
    /// Time the operation was invoked.
    pub invoke: u64,
    /// Time the response arrived; `None` while pending or if the outcome is
    /// [`Outcome::Unknown`], i.e. an infinitely late response.
    pub response: Option<u64>,
    /// What the client learned.
    pub outcome: Outcome,
}

/// Reasons a [`History`] rejects a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryError {
    /// The id was not returned by this history.
    NoSuchOp(OpId),
    /// The operation was already completed.
    AlreadyCompleted(OpId),
    /// The outcome does not fit the operation (e.g. `Read` for a `Put`).
    OutcomeMismatch(OpId),
    /// The response time precedes the invocation time.
    ResponseBeforeInvoke(OpId),
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::NoSuchOp(id) => write!(f, "no operation {id} in this history"),
            HistoryError::AlreadyCompleted(id) => write!(f, "operation {id} already completed"),
            HistoryError::OutcomeMismatch(id) => {
                write!(f, "outcome does not match the kind of operation {id}")
            }
            HistoryError::ResponseBeforeInvoke(id) => {
                write!(f, "operation {id} responds before it was invoked")
            }
        }
    }
}

impl std::error::Error for HistoryError {}

/// A record of operations issued against a key-value store.
///
/// Operations may be recorded in any order; only their timestamps matter.
#[derive(Debug, Clone, Default)]
pub struct History {
    ops: Vec<Operation>,
    // Separate from `response` because an operation completed as `Unknown`
    // has no response time yet must not be completed twice.
    completed: Vec<bool>,
}

impl History {
    /// Creates an empty history.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the invocation of `op` by `client` at time `at`. Until
    /// [`complete`](Self::complete)d the operation counts as
    /// [`Outcome::Unknown`].
    pub fn invoke(&mut self, client: ClientId, op: Op, at: u64) -> OpId {
        self.ops.push(Operation {
            client,
            op,
            invoke: at,
            response: None,
            outcome: Outcome::Unknown,
        });
        self.completed.push(false);
        OpId(self.ops.len() - 1)
    }

    /// Records the response to operation `id` at time `at`. With
    /// [`Outcome::Unknown`] the time is ignored, because the operation may
    /// still take effect later.
    ///
    /// # Errors
    ///
    /// Fails if `id` is unknown or already completed, if `outcome` does not
    /// fit the kind of operation, or if `at` precedes the invocation.
    pub fn complete(&mut self, id: OpId, outcome: Outcome, at: u64) -> Result<(), HistoryError> {
        let Some(op) = self.ops.get_mut(id.0) else {
            return Err(HistoryError::NoSuchOp(id));
        };
        if self.completed[id.0] {
            return Err(HistoryError::AlreadyCompleted(id));
        }
        let fits = matches!(
            (&op.op, &outcome),
            (_, Outcome::Unknown)
                | (Op::Put { .. } | Op::Delete { .. }, Outcome::Done)
                | (Op::Get { .. }, Outcome::Read(_))
                | (Op::Cas { .. }, Outcome::Cas(_))
        );
        if !fits {
            return Err(HistoryError::OutcomeMismatch(id));
        }
        if at < op.invoke {
            return Err(HistoryError::ResponseBeforeInvoke(id));
        }
        op.response = (outcome != Outcome::Unknown).then_some(at);
        op.outcome = outcome;
        self.completed[id.0] = true;
        Ok(())
    }

    /// Records a whole operation at once: [`invoke`](Self::invoke) followed by
    /// [`complete`](Self::complete).
    ///
    /// # Errors
    ///
    /// As for [`complete`](Self::complete); nothing is recorded then.
    pub fn record(
        &mut self,
        client: ClientId,
        op: Op,
        invoke: u64,
        outcome: Outcome,
        response: u64,
    ) -> Result<OpId, HistoryError> {
        let id = self.invoke(client, op, invoke);
        if let Err(e) = self.complete(id, outcome, response) {
            self.ops.pop();
            self.completed.pop();
            return Err(e);
        }
        Ok(id)
    }

    /// The operation recorded as `id`.
    #[must_use]
    pub fn operation(&self, id: OpId) -> Option<&Operation> {
        self.ops.get(id.0)
    }

    /// Number of recorded operations.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing has been recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Limits on the work [`check`] may do before giving up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Maximum number of search steps over all keys; `None` for no limit.
    pub max_steps: Option<u64>,
    /// Maximum wall-clock time over all keys; `None` for no limit.
    pub max_time: Option<Duration>,
    /// Approximate memory allowed for one key's cache of explored states, in
    /// bytes; `None` for no limit. The cache grows by one entry per step, so
    /// a long time budget alone does not bound memory.
    pub max_cache_bytes: Option<usize>,
}

impl Budget {
    /// No limits at all: [`check`] may run (and allocate) indefinitely.
    pub const UNLIMITED: Budget = Budget {
        max_steps: None,
        max_time: None,
        max_cache_bytes: None,
    };

    /// At most `steps` search steps, with no time or memory limit.
    #[must_use]
    pub fn steps(steps: u64) -> Self {
        Budget {
            max_steps: Some(steps),
            ..Self::UNLIMITED
        }
    }

    /// At most `time` of wall-clock time, and the default memory limit.
    #[must_use]
    pub fn time(time: Duration) -> Self {
        Budget {
            max_time: Some(time),
            ..Self::default()
        }
    }
}

impl Default for Budget {
    /// Ten seconds and 1 GiB of cache: generous for realistic test histories,
    /// yet a pathological one cannot stall a test suite or exhaust memory.
    fn default() -> Self {
        Budget {
            max_steps: None,
            max_time: Some(Duration::from_secs(10)),
            max_cache_bytes: Some(1 << 30),
        }
    }
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Some total order of the operations respects both real time and the
    /// sequential semantics of the store.
    Linearizable,
    /// No such order exists for the operations on `key`.
    NotLinearizable {
        /// The key whose sub-history is not linearizable.
        key: String,
        /// Operations on `key` that are not linearizable even on their own,
        /// sorted by id. Made locally minimal when small enough (see
        /// `explanation`); otherwise the operations up to where the search
        /// got stuck.
        witness: Vec<OpId>,
        /// Human-readable account of the violation.
        explanation: String,
    },
    /// The budget ran out before some key could be decided.
    Inconclusive(String),
}

impl Verdict {
    /// Whether the verdict is [`Verdict::Linearizable`].
    #[must_use]
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Linearizable => f.write_str("linearizable"),
            Verdict::NotLinearizable { explanation, .. } => {
                write!(f, "not linearizable: {explanation}")
            }
            Verdict::Inconclusive(why) => write!(f, "inconclusive: {why}"),
        }
    }
}

/// Checks whether `history` is linearizable with respect to a map of
/// independent registers, spending at most `budget`.
///
/// Keys are checked in sorted order and the first violation found is
/// reported. A key that exhausts the budget does not stop the others from
/// being checked, so a violation elsewhere still wins over `Inconclusive`.
#[must_use]
pub fn check(history: &History, budget: Budget) -> Verdict {
    let mut meter = Meter::new(budget);
    let mut undecided = Vec::new();
    for (name, ids) in partition(history) {
        let key = key_history(history, name, &ids);
        match search(&key.ops, &mut meter) {
            Search::Linearizable => {}
            Search::Violation(stuck) => return report(history, &key, &stuck, &meter),
            Search::OutOfBudget(why) => undecided.push(format!("key {:?}: {why}", key.name)),
        }
    }
    if undecided.is_empty() {
        Verdict::Linearizable
    } else {
        Verdict::Inconclusive(format!(
            "{} key(s) undecided; {}",
            undecided.len(),
            undecided.join("; ")
        ))
    }
}

/// Interned register value; `ABSENT` stands for a missing key.
type Value = u32;
const ABSENT: Value = 0;
/// Stands for every value that no operation observes. The model cannot tell
/// such values apart, and merging them lets the cache merge search states.
const UNOBSERVED: Value = Value::MAX;
const NIL: usize = usize::MAX;
const HEAD: usize = 0;
/// Witnesses up to this size are shrunk one operation at a time.
const SHRINK_LIMIT: usize = 64;
/// Steps allowed per shrinking attempt and in all, so that reporting a
/// violation cannot take much longer than finding it.
const SHRINK_STEPS: u64 = 200_000;
const SHRINK_TOTAL_STEPS: u64 = 5_000_000;

/// An operation reduced to its effect on one register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    /// Put (of an interned value) or Delete (`ABSENT`).
    Write(Value),
    /// Get that observed a value.
    Read(Value),
    /// Cas that swapped, or might have if its outcome is unknown: an unknown
    /// Cas that failed is indistinguishable from one that never happened.
    Cas { expect: Value, new: Value },
    /// Cas that reported failure.
    CasFailed { expect: Value },
}

#[derive(Debug, Clone, Copy)]
struct KeyOp {
    /// Index into `History::ops`.
    id: usize,
    invoke: u64,
    /// Time by which the operation must have taken effect. `None` makes it
    /// optional: it may take effect at any time after `invoke`, or never.
    /// Operations with unknown outcomes are optional unless shown to have
    /// taken effect.
    deadline: Option<u64>,
    step: Step,
}

impl KeyOp {
    fn required(&self) -> bool {
        self.deadline.is_some()
    }

    fn apply(&self, state: Value) -> Option<Value> {
        match self.step {
            Step::Write(v) => Some(v),
            Step::Read(v) => (state == v).then_some(state),
            Step::Cas { expect, new } => (state == expect).then_some(new),
            Step::CasFailed { expect } => (state != expect).then_some(state),
        }
    }

    fn written(&self) -> Option<Value> {
        match self.step {
            Step::Write(v) | Step::Cas { new: v, .. } => Some(v),
            Step::Read(_) | Step::CasFailed { .. } => None,
        }
    }

    /// Whether the operation can only succeed when the register holds `v`.
    fn needs(&self, v: Value) -> bool {
        match self.step {
            Step::Read(x) | Step::Cas { expect: x, .. } => x == v,
            Step::Write(_) | Step::CasFailed { .. } => false,
        }
    }

    /// Whether the outcome of the operation depends on the register being
    /// `v` rather than something else.
    fn cares_about(&self, v: Value) -> bool {
        match self.step {
            Step::Read(x) | Step::Cas { expect: x, .. } => x == v,
            Step::CasFailed { expect } => expect != v,
            Step::Write(_) => false,
        }
    }
}

/// The sub-history of one key, prepared for the search.
struct KeyHistory<'a> {
    name: &'a str,
    /// Sorted by invocation, so linearized sets are nearly prefixes and
    /// their bitsets compress well in the cache.
    ops: Vec<KeyOp>,
    /// `values[v]` is the text of interned value `v`; index 0 is `ABSENT`.
    values: Vec<&'a str>,
}

impl KeyHistory<'_> {
    fn show(&self, v: Value) -> String {
        match v {
            ABSENT => show_value(None),
            UNOBSERVED => "a value no operation observed".to_string(),
            _ => show_value(Some(self.values[v as usize])),
        }
    }
}

/// Operation ids grouped by key, in key order.
fn partition(history: &History) -> BTreeMap<&str, Vec<usize>> {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (id, op) in history.ops.iter().enumerate() {
        by_key.entry(op.op.key()).or_default().push(id);
    }
    by_key
}

fn key_history<'a>(history: &'a History, name: &'a str, ids: &[usize]) -> KeyHistory<'a> {
    let mut values = vec![""];
    let mut index: HashMap<&str, Value> = HashMap::new();
    let mut intern = |v: Option<&'a str>| match v {
        None => ABSENT,
        Some(s) => *index.entry(s).or_insert_with(|| {
            values.push(s);
            (values.len() - 1) as Value
        }),
    };
    let mut ops = Vec::with_capacity(ids.len());
    for &id in ids {
        let rec = &history.ops[id];
        let step = match (&rec.op, &rec.outcome) {
            (Op::Get { .. }, Outcome::Read(v)) => Step::Read(intern(v.as_deref())),
            // Unknown reads constrain nothing; `History` rules out other outcomes.
            (Op::Get { .. }, _) => continue,
            (Op::Put { value, .. }, _) => Step::Write(intern(Some(value))),
            (Op::Delete { .. }, _) => Step::Write(ABSENT),
            (Op::Cas { expect, .. }, Outcome::Cas(false)) => Step::CasFailed {
                expect: intern(expect.as_deref()),
            },
            (Op::Cas { expect, new, .. }, _) => Step::Cas {
                expect: intern(expect.as_deref()),
                new: intern(Some(new)),
            },
        };
        ops.push(KeyOp {
            id,
            invoke: rec.invoke,
            deadline: rec.response,
            step,
        });
    }
    merge_unobserved_values(&mut ops);
    let mut ops = plan_unknown_outcomes(&ops);
    ops.sort_by_key(|o| (o.invoke, o.id));
    KeyHistory { name, ops, values }
}

fn merge_unobserved_values(ops: &mut [KeyOp]) {
    let observed: HashSet<Value> = ops
        .iter()
        .filter_map(|o| match o.step {
            Step::Read(v) | Step::Cas { expect: v, .. } | Step::CasFailed { expect: v } => Some(v),
            Step::Write(_) => None,
        })
        .collect();
    for o in ops {
        if let Step::Write(v) | Step::Cas { new: v, .. } = &mut o.step {
            if *v != ABSENT && !observed.contains(v) {
                *v = UNOBSERVED;
            }
        }
    }
}

/// Operations with unknown outcomes never have to be linearized, so each one
/// stays pending to the end of the search and multiplies the states it must
/// refute. Use facts that hold in every linearization to shrink their number
/// (`v` is the value the operation would write):
///
/// - If it is the only writer of `v` and a completed operation needs `v`,
///   it must have taken effect before that operation responded: it becomes
///   required, with that deadline.
/// - If no operation responding after its invocation could depend on the
///   register holding `v`, taking effect can only hurt: it is dropped.
fn plan_unknown_outcomes(ops: &[KeyOp]) -> Vec<KeyOp> {
    let mut writers: HashMap<Value, usize> = HashMap::new();
    for v in ops.iter().filter_map(KeyOp::written) {
        *writers.entry(v).or_default() += 1;
    }
    let mut planned = Vec::with_capacity(ops.len());
    for (u, op) in ops.iter().enumerate() {
        let Some(v) = op.written().filter(|_| !op.required()) else {
            planned.push(*op);
            continue;
        };
        let first_need = ops
            .iter()
            .filter(|o| o.required() && o.needs(v))
            .filter_map(|o| o.deadline)
            .min();
        if let Some(due) = first_need.filter(|_| v != ABSENT && writers[&v] == 1) {
            planned.push(KeyOp {
                // A need before the invocation is a violation the search will
                // find anyway; keep the event order well formed.
                deadline: Some(due.max(op.invoke)),
                ..*op
            });
            continue;
        }
        let relevant = ops.iter().enumerate().any(|(j, o)| match o.deadline {
            Some(d) => d >= op.invoke && o.cares_about(v),
            None => j != u && o.needs(v),
        });
        if relevant {
            planned.push(*op);
        }
    }
    planned
}

/// Counts search steps against a [`Budget`].
struct Meter {
    budget: Budget,
    steps: u64,
    max_steps: Option<u64>,
    deadline: Option<Instant>,
}

impl Meter {
    fn new(budget: Budget) -> Self {
        Meter {
            budget,
            steps: 0,
            max_steps: budget.max_steps,
            // An absurdly large duration overflows `Instant`; treat it as none.
            deadline: budget.max_time.and_then(|d| Instant::now().checked_add(d)),
        }
    }

    /// A meter for a side computation: its own step allowance, same deadline.
    fn child(&self, steps: u64) -> Meter {
        Meter {
            budget: self.budget,
            steps: 0,
            max_steps: Some(steps),
            deadline: self.deadline,
        }
    }

    fn tick(&mut self) -> Result<(), String> {
        self.steps += 1;
        if self.max_steps.is_some_and(|max| self.steps > max) {
            return Err(format!(
                "step budget exhausted after {} steps",
                self.steps - 1
            ));
        }
        // Reading the clock every step would cost more than the step itself.
        if self.steps.is_multiple_of(256) && self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(format!(
                "time budget of {:?} exhausted",
                self.budget.max_time.unwrap_or_default()
            ));
        }
        Ok(())
    }
}

enum Search {
    Linearizable,
    Violation(Stuck),
    OutOfBudget(String),
}

/// The deepest point the search reached before it had to backtrack for good.
#[derive(Default)]
struct Stuck {
    /// Indices of the linearized operations, in linearization order.
    order: Vec<usize>,
    /// Register value after `order`.
    state: Value,
    /// The required operation whose deadline the search could not get past.
    blocked: Option<usize>,
    /// Set when `blocked` needs a value nobody could have written by then.
    unwritten: bool,
}

/// Doubly linked list of call/return events that supports O(1) removal and
/// reinsertion of an operation (the "dancing links" trick), so backtracking
/// restores the list exactly.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl Events {
    fn unlink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = q;
        if q != NIL {
            self.prev[q] = p;
        }
    }

    fn relink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = n;
        if q != NIL {
            self.prev[q] = n;
        }
    }

    fn lift(&mut self, call: usize, ret: usize) {
        self.unlink(call);
        if ret != NIL {
            self.unlink(ret);
        }
    }

    /// Must undo the most recent `lift`, as relinking relies on the
    /// neighbours recorded at unlink time still being valid.
    fn unlift(&mut self, call: usize, ret: usize) {
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// A stored bitset.
type Bits = Box<[u64]>;

/// Explored search states. A state is the set of linearized required
/// operations, the register value, and the set of optional operations used
/// up. Having an optional operation still available is never worse than
/// having used it up, so a state needs no exploring if the same required set
/// and value were already reached with a subset of its optional operations
/// used: that state was explored (or is being explored further up the stack)
/// with at least the same options.
///
/// The required set is stored as the index of its first bitset word that is
/// not all ones, followed by the words from there to the last non-zero one:
/// linearized sets are close to prefixes of the invocation order, so this is
/// a few words instead of `n / 64`.
#[derive(Default)]
struct Cache {
    seen: HashMap<(Bits, Value), Vec<Bits>>,
    bytes: usize,
}

impl Cache {
    fn key(bits: &[u64], state: Value) -> (Bits, Value) {
        let first = bits
            .iter()
            .position(|&w| w != u64::MAX)
            .unwrap_or(bits.len());
        let end = bits
            .iter()
            .rposition(|&w| w != 0)
            .map_or(0, |l| l + 1)
            .max(first);
        let mut key = Vec::with_capacity(1 + end - first);
        key.push(first as u64);
        key.extend_from_slice(&bits[first..end]);
        (key.into_boxed_slice(), state)
    }

    /// Records a state about to be explored; false if it needs no exploring.
    fn visit(&mut self, required: &[u64], optional: &[u64], state: Value) -> bool {
        let key = Self::key(required, state);
        let key_size = 64 + 8 * key.0.len();
        let subset = |a: &[u64], b: &[u64]| a.iter().zip(b).all(|(x, y)| x & !y == 0);
        let explored = self.seen.entry(key).or_insert_with(|| {
            self.bytes += key_size;
            Vec::new()
        });
        if explored.iter().any(|used| subset(used, optional)) {
            return false;
        }
        // States this one dominates can no longer prune anything it cannot.
        explored.retain(|used| !subset(optional, used));
        explored.push(optional.into());
        self.bytes += 16 + 8 * optional.len();
        true
    }
}

/// A linearized operation on the search stack.
struct Frame {
    call: usize,
    /// Register value before the operation.
    prior: Value,
    /// Optional operation used up to let a failed Cas fail, or `NIL`.
    enabler: usize,
}

/// Finds a required operation that needs a value no operation invoked
/// before its deadline writes. This common violation (a lost or invented
/// write) is found here in linear time instead of by refuting every
/// ordering of the operations before it.
fn unwritten_need(ops: &[KeyOp]) -> Option<usize> {
    let mut first_write: HashMap<Value, u64> = HashMap::new();
    for op in ops {
        if let Some(v) = op.written() {
            let t = first_write.entry(v).or_insert(op.invoke);
            *t = (*t).min(op.invoke);
        }
    }
    ops.iter().position(|op| {
        let need = match op.step {
            Step::Read(v) | Step::Cas { expect: v, .. } => v,
            Step::Write(_) | Step::CasFailed { .. } => return false,
        };
        let Some(due) = op.deadline else {
            return false;
        };
        need != ABSENT && first_write.get(&need).is_none_or(|&t| t > due)
    })
}

/// Wing & Gong / Lowe search over one key's operations.
///
/// Besides the dominance pruning in [`Cache`], optional operations are
/// pruned in two ways:
///
/// - Pending optional operations with the same effect are interchangeable
///   once invoked, so only the earliest unused one of each class is tried;
///   this also keeps the sets of used ones canonical for the cache.
/// - One that writes an unobserved value can only ever help a failed Cas
///   (nothing reads that value), and helps no less if it takes effect right
///   before that Cas. So such operations are never tried on their own: a
///   failed Cas that finds the register holding its `expect` uses one up.
fn search(ops: &[KeyOp], meter: &mut Meter) -> Search {
    if let Some(i) = unwritten_need(ops) {
        return Search::Violation(Stuck {
            blocked: Some(i),
            unwritten: true,
            ..Stuck::default()
        });
    }
    // (time, is_return, op): `false` sorts first, so at equal times calls
    // precede returns and touching intervals count as concurrent.
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        order.push((op.invoke, false, i));
        if let Some(t) = op.deadline {
            order.push((t, true, i));
        }
    }
    order.sort_unstable();

    // Node 0 is a sentinel head so unlinking never special-cases the front.
    // Node indices follow event order, which `enabler` relies on.
    let nodes = order.len() + 1;
    let mut node_op = vec![NIL; nodes];
    let mut is_call = vec![false; nodes];
    let mut call_node = vec![NIL; ops.len()];
    let mut return_node = vec![NIL; ops.len()];
    for (k, &(_, is_return, op)) in order.iter().enumerate() {
        node_op[k + 1] = op;
        is_call[k + 1] = !is_return;
        if is_return {
            return_node[op] = k + 1;
        } else {
            call_node[op] = k + 1;
        }
    }
    let mut events = Events {
        next: (1..=nodes)
            .map(|k| if k == nodes { NIL } else { k })
            .collect(),
        prev: (0..nodes)
            .map(|k| if k == HEAD { NIL } else { k - 1 })
            .collect(),
    };

    let mut classes: HashMap<Step, usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut class = vec![NIL; ops.len()];
    let mut rank = vec![0; ops.len()];
    // `ops` is sorted by invocation, so members are too.
    for (i, op) in ops.iter().enumerate().filter(|(_, o)| !o.required()) {
        let next = classes.len();
        let c = *classes.entry(op.step).or_insert(next);
        if c == members.len() {
            members.push(Vec::new());
        }
        class[i] = c;
        rank[i] = members[c].len();
        members[c].push(i);
    }
    let mut used = vec![0; members.len()];
    let lazy = |i: usize| !ops[i].required() && ops[i].written() == Some(UNOBSERVED);
    // Lazy operations are never scanned for, so keep the scans short.
    for i in (0..ops.len()).filter(|&i| lazy(i)) {
        events.unlink(call_node[i]);
    }
    let universal = classes.get(&Step::Write(UNOBSERVED)).copied();

    // Required and optional operations get separate bitsets (see `Cache`).
    let mut slot = vec![0; ops.len()];
    let (mut required_count, mut optional_count) = (0usize, 0usize);
    for (i, op) in ops.iter().enumerate() {
        let count = if op.required() {
            &mut required_count
        } else {
            &mut optional_count
        };
        slot[i] = *count;
        *count += 1;
    }
    let mut required_bits = vec![0u64; required_count.div_ceil(64)];
    let mut optional_bits = vec![0u64; optional_count.div_ceil(64)];
    let flip = |i: usize, required: &mut [u64], optional: &mut [u64]| {
        let bits = if ops[i].required() {
            required
        } else {
            optional
        };
        bits[slot[i] / 64] ^= 1u64 << (slot[i] % 64);
    };
    let mut cache = Cache::default();
    let mut frames: Vec<Frame> = Vec::new();
    let mut state = ABSENT;
    let mut required_left = ops.iter().filter(|o| o.required()).count();
    let mut deepest: Option<Stuck> = None;

    let mut entry = events.next[HEAD];
    // Optional operations still pending at the end simply never took effect.
    while required_left > 0 {
        if let Err(why) = meter.tick() {
            return Search::OutOfBudget(why);
        }
        if meter
            .budget
            .max_cache_bytes
            .is_some_and(|max| cache.bytes > max)
        {
            return Search::OutOfBudget(format!("state cache exceeded {} bytes", cache.bytes));
        }

        if entry == NIL || !is_call[entry] {
            // A required operation must respond here but has not been placed.
            if deepest
                .as_ref()
                .is_none_or(|d| frames.len() > d.order.len())
            {
                deepest = Some(Stuck {
                    order: frames
                        .iter()
                        .flat_map(|f| [f.enabler, node_op[f.call]])
                        .filter(|&i| i != NIL)
                        .collect(),
                    state,
                    blocked: (entry != NIL).then(|| node_op[entry]),
                    unwritten: false,
                });
            }
            // The most recent choice was wrong: undo it, try the next one.
            let Some(frame) = frames.pop() else {
                return Search::Violation(deepest.unwrap_or_default());
            };
            let i = node_op[frame.call];
            flip(i, &mut required_bits, &mut optional_bits);
            if ops[i].required() {
                required_left += 1;
            } else {
                used[class[i]] -= 1;
            }
            if frame.enabler != NIL {
                flip(frame.enabler, &mut required_bits, &mut optional_bits);
                used[class[frame.enabler]] -= 1;
            }
            state = frame.prior;
            events.unlift(frame.call, return_node[i]);
            entry = events.next[frame.call];
            continue;
        }

        let i = node_op[entry];
        let mut enabler = NIL;
        let next_state = match (ops[i].step, ops[i].required()) {
            (Step::CasFailed { expect }, true) if state == expect => {
                // The enabler must be invoked before the first pending
                // response, so that it can precede everything placed later.
                let mut horizon = entry;
                while horizon != NIL && is_call[horizon] {
                    horizon = events.next[horizon];
                }
                let specific = classes
                    .get(&Step::Cas {
                        expect,
                        new: UNOBSERVED,
                    })
                    .copied();
                // A specific enabler serves fewer Cas than a universal one,
                // so spending it first keeps more options open.
                enabler = [specific, universal]
                    .into_iter()
                    .flatten()
                    .filter_map(|c| members[c].get(used[c]).copied())
                    .find(|&u| call_node[u] < horizon)
                    .unwrap_or(NIL);
                (enabler != NIL).then_some(UNOBSERVED)
            }
            (_, true) => ops[i].apply(state),
            // Using an optional operation as a no-op only removes options.
            (_, false) if rank[i] == used[class[i]] => ops[i].apply(state).filter(|&s| s != state),
            (_, false) => None,
        };

        if let Some(next_state) = next_state {
            flip(i, &mut required_bits, &mut optional_bits);
            if enabler != NIL {
                flip(enabler, &mut required_bits, &mut optional_bits);
            }
            if cache.visit(&required_bits, &optional_bits, next_state) {
                frames.push(Frame {
                    call: entry,
                    prior: state,
                    enabler,
                });
                state = next_state;
                if ops[i].required() {
                    required_left -= 1;
                } else {
                    used[class[i]] += 1;
                }
                if enabler != NIL {
                    used[class[enabler]] += 1;
                }
                events.lift(entry, return_node[i]);
                entry = events.next[HEAD];
                continue;
            }
            // Explored before, reached by another order: not worth a revisit.
            flip(i, &mut required_bits, &mut optional_bits);
            if enabler != NIL {
                flip(enabler, &mut required_bits, &mut optional_bits);
            }
        }
        entry = events.next[entry];
    }
    Search::Linearizable
}

/// Whether the operations `ids` on key `name` are, by themselves, not
/// linearizable for a reason other than needing a value none of them writes
/// (which only means a shrinking step cut off its writer); `None` if the
/// shrinking budget ran out before deciding.
fn violates(history: &History, name: &str, ids: &[usize], meter: &mut Meter) -> Option<bool> {
    let key = key_history(history, name, ids);
    let left = meter.max_steps.unwrap_or(0).saturating_sub(meter.steps);
    let mut attempt = meter.child(left.min(SHRINK_STEPS));
    let result = search(&key.ops, &mut attempt);
    meter.steps += attempt.steps;
    match result {
        Search::Linearizable => Some(false),
        Search::Violation(stuck) => Some(!stuck.unwritten),
        Search::OutOfBudget(_) => None,
    }
}

/// Dropping the only write of a value that someone observed would turn the
/// witness into "a read of a value nobody wrote", which is smaller but says
/// nothing about the real problem, so such writes are kept.
fn removable(history: &History, ids: &[usize], pos: usize) -> bool {
    let written = |id: usize| {
        let rec = &history.ops[id];
        match (&rec.op, &rec.outcome) {
            (Op::Put { value, .. }, _) => Some(value),
            (Op::Cas { new, .. }, Outcome::Cas(true) | Outcome::Unknown) => Some(new),
            _ => None,
        }
    };
    let needs = |id: usize, v: &String| {
        let rec = &history.ops[id];
        match (&rec.op, &rec.outcome) {
            (Op::Get { .. }, Outcome::Read(Some(x))) => x == v,
            (
                Op::Cas {
                    expect: Some(x), ..
                },
                Outcome::Cas(true) | Outcome::Unknown,
            ) => x == v,
            _ => false,
        }
    };
    // Absent values need no writer: the initial state supplies them.
    let Some(v) = written(ids[pos]) else {
        return true;
    };
    !ids.iter().any(|&id| needs(id, v))
        || ids
            .iter()
            .enumerate()
            .any(|(p, &id)| p != pos && written(id) == Some(v))
}

/// Shrinks the key's operations to a small set (of history ids) that is
/// still not linearizable, and says whether it is known to be minimal.
fn minimize(
    history: &History,
    key: &KeyHistory<'_>,
    stuck: &Stuck,
    meter: &Meter,
) -> (Vec<usize>, bool) {
    if let (Some(b), true) = (stuck.blocked, stuck.unwritten) {
        // Needing a value nobody writes is a violation all by itself, unless
        // the operation was only required because a completed operation
        // needs what it writes (see `plan_unknown_outcomes`): then that one
        // belongs in the witness too.
        let op = &key.ops[b];
        let mut witness = vec![op.id];
        if history.ops[op.id].response.is_none() {
            let needer = op.written().and_then(|v| {
                key.ops
                    .iter()
                    .filter(|o| history.ops[o.id].response.is_some() && o.needs(v))
                    .min_by_key(|o| o.deadline)
            });
            witness.extend(needer.map(|o| o.id));
        }
        witness.sort_unstable();
        return (witness, true);
    }
    let mut shrink = meter.child(SHRINK_TOTAL_STEPS);
    let mut ids: Vec<usize> = key.ops.iter().map(|o| o.id).collect();
    ids.sort_by_key(|&id| (history.ops[id].invoke, id));
    // The cause is usually close before the point where the search got
    // stuck, so try ever smaller windows ending there. They are guesses
    // (dropping earlier operations can also remove the violation), hence
    // the re-checks.
    if let Some(horizon) = stuck.blocked.and_then(|b| key.ops[b].deadline) {
        for len in [ids.len(), 4 * SHRINK_LIMIT, SHRINK_LIMIT, SHRINK_LIMIT / 4] {
            let end = ids.partition_point(|&id| history.ops[id].invoke <= horizon);
            let start = end.saturating_sub(len);
            if end - start < ids.len()
                && violates(history, key.name, &ids[start..end], &mut shrink) == Some(true)
            {
                ids = ids[start..end].to_vec();
            }
        }
    }
    if ids.len() > SHRINK_LIMIT {
        return (ids, false);
    }
    let mut exact = true;
    loop {
        let mut changed = false;
        // Later operations go first: they are the likelier bystanders.
        for pos in (0..ids.len()).rev() {
            if pos >= ids.len() || !removable(history, &ids, pos) {
                continue;
            }
            let mut candidate = ids.clone();
            candidate.remove(pos);
            match violates(history, key.name, &candidate, &mut shrink) {
                Some(true) => {
                    ids = candidate;
                    changed = true;
                }
                Some(false) => {}
                None => exact = false,
            }
        }
        if !changed {
            return (ids, exact);
        }
    }
}

fn report(history: &History, key: &KeyHistory<'_>, stuck: &Stuck, meter: &Meter) -> Verdict {
    let ops = &key.ops;
    let line = |id: usize| format!("  {}", describe(history, id));
    let (witness, minimal) = minimize(history, key, stuck, meter);
    let mut lines = vec![format!(
        "key {:?}: no valid linearization of its {} relevant operation(s).",
        key.name,
        ops.len()
    )];

    if witness.len() <= SHRINK_LIMIT {
        lines.push(format!(
            "Witness: these {} operation(s) are not linearizable even on their own{}:",
            witness.len(),
            if minimal {
                "; without any one of them (other than the only write of a needed value) \
                 they would be"
            } else {
                ""
            }
        ));
        let mut sorted = witness.clone();
        sorted.sort_by_key(|&id| (history.ops[id].invoke, id));
        lines.extend(sorted.into_iter().map(line));
    } else {
        lines.push(format!(
            "Witness: {} operation(s), too many to minimize or list.",
            witness.len()
        ));
    }

    if let (Some(b), true) = (stuck.blocked, stuck.unwritten) {
        lines.push(format!(
            "{} needs a value that no operation invoked by t={} writes:",
            OpId(ops[b].id),
            ops[b].deadline.unwrap_or(u64::MAX)
        ));
        lines.push(line(ops[b].id));
    } else {
        explain_search(history, key, stuck, &mut lines);
    }

    Verdict::NotLinearizable {
        key: key.name.to_string(),
        witness: witness.into_iter().map(OpId).collect(),
        explanation: lines.join("\n"),
    }
}

/// Describes where the search got stuck: the deepest linearizable prefix it
/// found and the operation it could not place next.
fn explain_search(history: &History, key: &KeyHistory<'_>, stuck: &Stuck, lines: &mut Vec<String>) {
    const SHOWN: usize = 12;
    let ops = &key.ops;
    let line = |id: usize| format!("  {}", describe(history, id));
    // The interned state may stand for several unobserved values; the last
    // write placed says which one it really was.
    let left = stuck
        .order
        .iter()
        .rev()
        .find_map(|&i| {
            ops[i].written()?;
            match &history.ops[ops[i].id].op {
                Op::Put { value, .. } | Op::Cas { new: value, .. } => Some(show_value(Some(value))),
                _ => Some(show_value(None)),
            }
        })
        .unwrap_or_else(|| key.show(stuck.state));
    lines.push(format!(
        "Deepest search point: {} of {} operation(s) linearized, leaving {left}{}",
        stuck.order.len(),
        ops.len(),
        if stuck.order.is_empty() {
            "."
        } else {
            "; the last ones placed, in order:"
        }
    ));
    let skipped = stuck.order.len().saturating_sub(SHOWN);
    if skipped > 0 {
        lines.push(format!("  ... {skipped} earlier"));
    }
    lines.extend(stuck.order[skipped..].iter().map(|&i| line(ops[i].id)));

    if let Some(b) = stuck.blocked {
        let horizon = ops[b].deadline.unwrap_or(u64::MAX);
        lines.push(format!(
            "Could not place {} by t={horizon}:",
            OpId(ops[b].id)
        ));
        lines.push(line(ops[b].id));
        let placed: HashSet<usize> = stuck.order.iter().copied().collect();
        let pending: Vec<usize> = (0..ops.len())
            .filter(|&i| i != b && !placed.contains(&i) && ops[i].invoke <= horizon)
            .collect();
        if pending.is_empty() {
            lines.push("No other operation was pending.".to_string());
        } else {
            lines.push(format!(
                "No order of the {} other pending operation(s) allows it:",
                pending.len()
            ));
            lines.extend(pending.iter().take(SHOWN).map(|&i| line(ops[i].id)));
            if pending.len() > SHOWN {
                lines.push(format!("  ... {} more", pending.len() - SHOWN));
            }
        }
    }
}

fn show_value(v: Option<&str>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "absent".to_string(),
    }
}

/// One-line description of a recorded operation for reports.
fn describe(history: &History, id: usize) -> String {
    let rec = &history.ops[id];
    let call = match &rec.op {
        Op::Put { key, value } => format!("put({key:?}, {value:?})"),
        Op::Get { key } => format!("get({key:?})"),
        Op::Cas { key, expect, new } => {
            format!("cas({key:?}, {} -> {new:?})", show_value(expect.as_deref()))
        }
        Op::Delete { key } => format!("delete({key:?})"),
    };
    let result = match &rec.outcome {
        Outcome::Done => "ok".to_string(),
        Outcome::Read(v) => show_value(v.as_deref()),
        Outcome::Cas(swapped) => swapped.to_string(),
        Outcome::Unknown => "unknown".to_string(),
    };
    let response = rec
        .response
        .map_or_else(|| "?".to_string(), |t| t.to_string());
    format!(
        "{} client {} [{}, {response}] {call} => {result}",
        OpId(id),
        rec.client,
        rec.invoke
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    fn get(key: &str) -> Op {
        Op::Get { key: key.into() }
    }

    fn cas(key: &str, expect: Option<&str>, new: &str) -> Op {
        Op::Cas {
            key: key.into(),
            expect: expect.map(Into::into),
            new: new.into(),
        }
    }

    fn del(key: &str) -> Op {
        Op::Delete { key: key.into() }
    }

    fn read(v: Option<&str>) -> Outcome {
        Outcome::Read(v.map(Into::into))
    }

    /// Records a completed operation; `client` doubles as a label in reports.
    fn rec(h: &mut History, client: ClientId, op: Op, t: (u64, u64), outcome: Outcome) -> OpId {
        h.record(client, op, t.0, outcome, t.1).unwrap()
    }

    fn verdict(h: &History) -> Verdict {
        check(h, Budget::default())
    }

    fn assert_lin(h: &History) {
        let v = verdict(h);
        assert!(v.is_linearizable(), "expected linearizable, got {v}");
    }

    /// Asserts a violation on `key` and returns the witness.
    fn assert_violation(h: &History, key: &str) -> Vec<OpId> {
        match verdict(h) {
            Verdict::NotLinearizable {
                key: k,
                witness,
                explanation,
            } => {
                assert_eq!(k, key, "{explanation}");
                assert!(explanation.contains(&format!("{key:?}")), "{explanation}");
                witness
            }
            other => panic!("expected a violation on {key:?}, got {other}"),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let mut h = History::new();
        rec(&mut h, 1, get("x"), (0, 1), read(None));
        rec(&mut h, 1, put("x", "1"), (2, 3), Outcome::Done);
        rec(&mut h, 2, get("x"), (4, 5), read(Some("1")));
        rec(
            &mut h,
            1,
            cas("x", Some("1"), "2"),
            (6, 7),
            Outcome::Cas(true),
        );
        rec(
            &mut h,
            2,
            cas("x", Some("1"), "3"),
            (8, 9),
            Outcome::Cas(false),
        );
        rec(&mut h, 2, get("x"), (10, 11), read(Some("2")));
        rec(&mut h, 1, del("x"), (12, 13), Outcome::Done);
        rec(&mut h, 2, get("x"), (14, 15), read(None));
        rec(&mut h, 2, cas("x", None, "4"), (16, 17), Outcome::Cas(true));
        rec(&mut h, 1, get("x"), (18, 19), read(Some("4")));
        assert_lin(&h);
        assert_lin(&History::new());
    }

    #[test]
    fn stale_read_after_completed_put_is_not_linearizable() {
        let mut h = History::new();
        let a = rec(&mut h, 1, put("x", "1"), (0, 10), Outcome::Done);
        let b = rec(&mut h, 1, put("x", "2"), (20, 30), Outcome::Done);
        let c = rec(&mut h, 2, get("x"), (40, 50), read(Some("1")));
        assert_eq!(assert_violation(&h, "x"), vec![a, b, c]);

        // Reading "absent" after a completed put is stale too.
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 10), Outcome::Done);
        rec(&mut h, 2, get("x"), (11, 12), read(None));
        assert_violation(&h, "x");
    }

    #[test]
    fn concurrent_get_may_see_old_or_new_value() {
        for seen in ["1", "2"] {
            let mut h = History::new();
            rec(&mut h, 1, put("x", "1"), (0, 1), Outcome::Done);
            rec(&mut h, 1, put("x", "2"), (2, 10), Outcome::Done);
            rec(&mut h, 2, get("x"), (3, 4), read(Some(seen)));
            assert_lin(&h);
        }
        // Intervals that merely touch count as overlapping.
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 5), Outcome::Done);
        rec(&mut h, 2, get("x"), (5, 6), read(None));
        assert_lin(&h);
    }

    #[test]
    fn reads_must_not_go_back_in_time_during_a_write() {
        // The write of "2" overlaps both reads. Once a read has returned "2",
        // the write has taken effect, so a later read may not see "1" again.
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 5), Outcome::Done);
        rec(&mut h, 1, put("x", "2"), (6, 100), Outcome::Done);
        rec(&mut h, 2, get("x"), (10, 20), read(Some("2")));
        rec(&mut h, 3, get("x"), (30, 40), read(Some("1")));
        let witness = assert_violation(&h, "x");
        assert_eq!(witness.len(), 4);

        // The opposite order is fine: the write landed between the reads.
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 5), Outcome::Done);
        rec(&mut h, 1, put("x", "2"), (6, 100), Outcome::Done);
        rec(&mut h, 2, get("x"), (10, 20), read(Some("1")));
        rec(&mut h, 3, get("x"), (30, 40), read(Some("2")));
        assert_lin(&h);
    }

    #[test]
    fn concurrent_cas_from_same_value() {
        let both = |second: bool| {
            let mut h = History::new();
            rec(&mut h, 1, put("x", "0"), (0, 1), Outcome::Done);
            rec(
                &mut h,
                1,
                cas("x", Some("0"), "1"),
                (2, 10),
                Outcome::Cas(true),
            );
            rec(
                &mut h,
                2,
                cas("x", Some("0"), "2"),
                (3, 9),
                Outcome::Cas(second),
            );
            h
        };
        assert_violation(&both(true), "x");
        assert_lin(&both(false));

        // A failed cas must have seen something other than `expect`.
        let mut h = History::new();
        rec(&mut h, 1, put("x", "0"), (0, 1), Outcome::Done);
        rec(
            &mut h,
            2,
            cas("x", Some("0"), "1"),
            (2, 3),
            Outcome::Cas(false),
        );
        assert_violation(&h, "x");
    }

    #[test]
    fn unknown_outcomes() {
        // An unknown put that is observed later took effect.
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 1), Outcome::Done);
        h.invoke(2, put("x", "2"), 5);
        rec(&mut h, 3, get("x"), (10, 11), read(Some("2")));
        rec(&mut h, 3, get("x"), (12, 13), read(Some("2")));
        assert_lin(&h);

        // ...but only once: it cannot be undone by a later read.
        rec(&mut h, 3, get("x"), (14, 15), read(Some("1")));
        assert_violation(&h, "x");

        // An unknown put that is never observed may simply not have happened,
        // even when a failed cas keeps it in the search.
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 1), Outcome::Done);
        let id = h.invoke(2, put("x", "2"), 5);
        h.complete(id, Outcome::Unknown, 7).unwrap();
        rec(&mut h, 3, get("x"), (10, 11), read(Some("1")));
        rec(
            &mut h,
            3,
            cas("x", Some("2"), "3"),
            (12, 13),
            Outcome::Cas(false),
        );
        rec(&mut h, 3, get("x"), (14, 15), read(Some("1")));
        assert_lin(&h);

        // An unknown put cannot take effect before it was invoked.
        let mut h = History::new();
        rec(&mut h, 3, get("x"), (0, 1), read(Some("2")));
        h.invoke(2, put("x", "2"), 5);
        assert_violation(&h, "x");

        // Unknown gets are ignored; an unknown cas may or may not swap.
        let mut h = History::new();
        h.invoke(1, get("x"), 0);
        rec(&mut h, 1, put("x", "1"), (1, 2), Outcome::Done);
        h.invoke(2, cas("x", Some("1"), "2"), 3);
        rec(&mut h, 3, get("x"), (4, 5), read(Some("1")));
        rec(&mut h, 3, get("x"), (6, 7), read(Some("2")));
        assert_lin(&h);
    }

    #[test]
    fn read_of_a_value_nobody_wrote() {
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 10), Outcome::Done);
        let bad = rec(&mut h, 2, get("x"), (5, 15), read(Some("ghost")));
        // The witness shrinks to the read alone.
        assert_eq!(assert_violation(&h, "x"), vec![bad]);
    }

    #[test]
    fn keys_are_independent_and_the_bad_key_is_named() {
        let mut h = History::new();
        // Both keys interleave in time; only "b" has a stale read.
        rec(&mut h, 1, put("a", "1"), (0, 10), Outcome::Done);
        rec(&mut h, 2, put("b", "1"), (1, 11), Outcome::Done);
        rec(&mut h, 1, put("a", "2"), (20, 30), Outcome::Done);
        rec(&mut h, 2, put("b", "2"), (21, 31), Outcome::Done);
        rec(&mut h, 3, get("a"), (40, 50), read(Some("2")));
        rec(&mut h, 4, get("b"), (41, 51), read(Some("1")));
        // Reading "a"'s value on "c" is not a read of "a".
        rec(&mut h, 5, get("c"), (60, 61), read(None));
        let witness = assert_violation(&h, "b");
        for id in witness {
            assert_eq!(h.operation(id).unwrap().op.key(), "b");
        }
    }

    #[test]
    fn explanation_names_the_stuck_operation() {
        let mut h = History::new();
        rec(&mut h, 1, put("x", "1"), (0, 10), Outcome::Done);
        rec(&mut h, 1, put("x", "2"), (20, 30), Outcome::Done);
        rec(&mut h, 7, get("x"), (40, 50), read(Some("1")));
        let Verdict::NotLinearizable { explanation, .. } = verdict(&h) else {
            panic!("expected a violation");
        };
        assert!(explanation.contains("Could not place #2"), "{explanation}");
        assert!(
            explanation.contains(r#"#2 client 7 [40, 50] get("x") => "1""#),
            "{explanation}"
        );
        assert!(explanation.contains(r#"leaving "2""#), "{explanation}");
    }

    #[test]
    fn history_rejects_malformed_completions() {
        let mut h = History::new();
        let id = h.invoke(1, get("x"), 10);
        assert_eq!(
            h.complete(id, Outcome::Done, 11),
            Err(HistoryError::OutcomeMismatch(id))
        );
        assert_eq!(
            h.complete(id, read(None), 9),
            Err(HistoryError::ResponseBeforeInvoke(id))
        );
        h.complete(id, read(None), 11).unwrap();
        assert_eq!(
            h.complete(id, read(None), 12),
            Err(HistoryError::AlreadyCompleted(id))
        );
        assert_eq!(
            h.complete(OpId(5), read(None), 12),
            Err(HistoryError::NoSuchOp(OpId(5)))
        );
        assert!(h
            .record(1, put("x", "1"), 0, Outcome::Cas(true), 1)
            .is_err());
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn pathological_history_is_inconclusive_within_budget() {
        // Forty fully concurrent puts, then reads "v0", "v1", "v0": impossible,
        // but refuting it means trying every subset of the puts.
        let mut h = History::new();
        for i in 0..40 {
            rec(
                &mut h,
                i,
                put("k", &format!("v{i}")),
                (0, 100),
                Outcome::Done,
            );
        }
        rec(&mut h, 99, get("k"), (200, 201), read(Some("v0")));
        rec(&mut h, 99, get("k"), (300, 301), read(Some("v1")));
        rec(&mut h, 99, get("k"), (400, 401), read(Some("v0")));

        let v = check(&h, Budget::steps(100_000));
        assert!(
            matches!(&v, Verdict::Inconclusive(why) if why.contains("step")),
            "{v}"
        );

        let start = Instant::now();
        let v = check(&h, Budget::time(Duration::from_millis(200)));
        assert!(
            matches!(&v, Verdict::Inconclusive(why) if why.contains("time")),
            "{v}"
        );
        assert!(start.elapsed() < Duration::from_secs(3));

        let memory = Budget {
            max_cache_bytes: Some(1 << 20),
            ..Budget::UNLIMITED
        };
        let v = check(&h, memory);
        assert!(
            matches!(&v, Verdict::Inconclusive(why) if why.contains("cache")),
            "{v}"
        );
    }

    /// xorshift64: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    fn build(ops: &[Operation]) -> History {
        let mut h = History::new();
        for (n, o) in ops.iter().enumerate() {
            match o.response {
                Some(t) => {
                    h.record(o.client, o.op.clone(), o.invoke, o.outcome.clone(), t)
                        .unwrap();
                }
                None => {
                    let id = h.invoke(o.client, o.op.clone(), o.invoke);
                    // Exercise both ways of leaving an outcome unknown.
                    if n % 2 == 0 {
                        h.complete(id, Outcome::Unknown, o.invoke + 1).unwrap();
                    }
                }
            }
        }
        h
    }

    /// Simulates `clients` clients against a real (atomic) store: every
    /// operation takes effect at a random instant inside its interval, so the
    /// history is linearizable by construction. Written values are unique.
    fn simulate(
        seed: u64,
        n: usize,
        clients: usize,
        keys: &[&str],
        unknown_pct: u64,
    ) -> Vec<Operation> {
        struct Planned {
            op: Operation,
            at: u64,
            applies: bool,
        }
        let mut rng = Rng(seed);
        let mut clock = vec![0u64; clients];
        let mut recent: HashMap<&str, Vec<String>> = HashMap::new();
        let mut planned = Vec::with_capacity(n);
        for serial in 0..n {
            // Always advance the client furthest behind, so all stay in step.
            let client = (0..clients).min_by_key(|&c| clock[c]).unwrap();
            let invoke = clock[client] + rng.below(20);
            let at = invoke + rng.below(40);
            let response = at + rng.below(40);
            clock[client] = response + 1;
            let key = keys[rng.below(keys.len() as u64) as usize];
            let value = format!("v{serial}");
            let op = match rng.below(100) {
                0..=44 => get(key),
                45..=74 => put(key, &value),
                75..=89 => {
                    let seen = recent.get(key).map_or(&[][..], |v| v.as_slice());
                    let expect = if seen.is_empty() || rng.chance(20) {
                        None
                    } else {
                        let k = rng.below(seen.len().min(3) as u64) as usize;
                        Some(seen[seen.len() - 1 - k].clone())
                    };
                    cas(key, expect.as_deref(), &value)
                }
                _ => del(key),
            };
            if matches!(op, Op::Put { .. } | Op::Cas { .. }) {
                recent.entry(key).or_default().push(value);
            }
            let unknown = rng.chance(unknown_pct);
            planned.push(Planned {
                op: Operation {
                    client: client as ClientId,
                    op,
                    invoke,
                    response: (!unknown).then_some(response),
                    outcome: Outcome::Unknown,
                },
                at,
                applies: !unknown || rng.chance(50),
            });
        }

        let mut by_time: Vec<usize> = (0..n).collect();
        by_time.sort_by_key(|&i| (planned[i].at, i));
        let mut store: HashMap<String, String> = HashMap::new();
        for i in by_time {
            let p = &mut planned[i];
            if !p.applies {
                continue;
            }
            let outcome = match &p.op.op {
                Op::Put { key, value } => {
                    store.insert(key.clone(), value.clone());
                    Outcome::Done
                }
                Op::Get { key } => Outcome::Read(store.get(key).cloned()),
                Op::Cas { key, expect, new } => {
                    let swap = store.get(key) == expect.as_ref();
                    if swap {
                        store.insert(key.clone(), new.clone());
                    }
                    Outcome::Cas(swap)
                }
                Op::Delete { key } => {
                    store.remove(key);
                    Outcome::Done
                }
            };
            if p.op.response.is_some() {
                p.op.outcome = outcome;
            }
        }
        planned.into_iter().map(|p| p.op).collect()
    }

    /// Mutates reads of a linearizable history at random positions so that
    /// they must be violations, and checks that each is caught on its key.
    /// Ghost reads see a value nobody wrote; stale reads see the value of a
    /// put that another completed put overwrote before the read began.
    fn assert_mutations_caught(ops: &[Operation], rng: &mut Rng, ghosts: usize, stale: usize) {
        let reads: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i].outcome, Outcome::Read(_)))
            .collect();
        let mut slowest = Duration::ZERO;
        for _ in 0..ghosts {
            let r = reads[rng.below(reads.len() as u64) as usize];
            let mut bad = ops.to_vec();
            bad[r].outcome = read(Some("ghost"));
            let start = Instant::now();
            assert_eq!(
                assert_violation(&build(&bad), ops[r].op.key()),
                vec![OpId(r)]
            );
            slowest = slowest.max(start.elapsed());
        }
        let done_put = |i: usize, key: &str| {
            matches!(ops[i].op, Op::Put { .. })
                && ops[i].op.key() == key
                && ops[i].response.is_some()
        };
        let mut caught = 0;
        while caught < stale {
            let r = reads[rng.below(reads.len() as u64) as usize];
            let key = ops[r].op.key();
            // Values are unique, so only `w1` ever wrote the stale value.
            let Some(w2) = (0..ops.len())
                .filter(|&i| done_put(i, key) && ops[i].response < Some(ops[r].invoke))
                .max_by_key(|&i| ops[i].invoke)
            else {
                continue;
            };
            let Some(w1) = (0..ops.len())
                .filter(|&i| done_put(i, key) && ops[i].response < Some(ops[w2].invoke))
                .max_by_key(|&i| ops[i].invoke)
            else {
                continue;
            };
            let Op::Put { value, .. } = &ops[w1].op else {
                unreachable!()
            };
            let mut bad = ops.to_vec();
            bad[r].outcome = read(Some(value));
            let start = Instant::now();
            let witness = assert_violation(&build(&bad), key);
            assert!(witness.contains(&OpId(r)), "{witness:?}");
            slowest = slowest.max(start.elapsed());
            caught += 1;
        }
        println!("  {ghosts} ghost and {stale} stale reads caught, slowest in {slowest:?}");
    }

    #[test]
    fn random_linearizable_histories_pass_and_mutations_are_caught() {
        let mut rng = Rng(0xdead_beef);
        // Refuting a history means exhausting every ordering of what precedes
        // the violation, which unknown outcomes make much costlier; so stale
        // reads, which need that search, are planted in smaller histories.
        for (keys, n, unknown_pct, stale) in [
            (&["k"][..], 5000, 5, 0),
            (&["a", "b", "c", "d"][..], 8000, 5, 0),
            (&["k"][..], 2000, 0, 5),
            (&["k"][..], 500, 5, 5),
            (&["a", "b", "c", "d"][..], 2000, 2, 5),
        ] {
            let ops = simulate(n as u64, n, 8, keys, unknown_pct);
            let start = Instant::now();
            let v = verdict(&build(&ops));
            let elapsed = start.elapsed();
            println!(
                "{n} ops, {} key(s), 8 clients, {unknown_pct}% unknown: {v} in {elapsed:?}",
                keys.len()
            );
            assert!(v.is_linearizable(), "{v}");
            assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
            assert_mutations_caught(&ops, &mut rng, 5, stale);
        }
    }

    /// Reference checker: tries every real-time-respecting order, with no
    /// pruning. Exponential, so only for a handful of single-key operations.
    fn brute_force(ops: &[Operation]) -> bool {
        fn go(ops: &[Operation], placed: &mut [bool], state: Option<String>) -> bool {
            if ops
                .iter()
                .zip(placed.iter())
                .all(|(o, &p)| p || o.response.is_none())
            {
                return true;
            }
            for i in 0..ops.len() {
                let o = &ops[i];
                let blocked = (0..ops.len())
                    .any(|j| !placed[j] && j != i && ops[j].response.is_some_and(|r| r < o.invoke));
                if placed[i] || blocked {
                    continue;
                }
                let next = match (&o.op, &o.outcome) {
                    (Op::Put { value, .. }, _) => Some(Some(value.clone())),
                    (Op::Delete { .. }, _) => Some(None),
                    (Op::Get { .. }, Outcome::Read(v)) => (state == *v).then(|| state.clone()),
                    (Op::Get { .. }, _) => Some(state.clone()),
                    (Op::Cas { expect, .. }, Outcome::Cas(false)) => {
                        (state != *expect).then(|| state.clone())
                    }
                    (Op::Cas { expect, new, .. }, Outcome::Cas(true)) => {
                        (state == *expect).then(|| Some(new.clone()))
                    }
                    (Op::Cas { expect, new, .. }, _) => Some(if state == *expect {
                        Some(new.clone())
                    } else {
                        state.clone()
                    }),
                };
                if let Some(next) = next {
                    placed[i] = true;
                    if go(ops, placed, next) {
                        return true;
                    }
                    placed[i] = false;
                }
            }
            false
        }
        go(ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = Rng(7);
        let values = [None, Some("a"), Some("b")];
        let (mut yes, mut no) = (0, 0);
        for _ in 0..40_000 {
            let n = 1 + rng.below(8) as usize;
            let ops: Vec<Operation> = (0..n)
                .map(|c| {
                    let invoke = rng.below(30);
                    let response = invoke + rng.below(15);
                    let value = |rng: &mut Rng| values[rng.below(3) as usize];
                    // "c" and "d" are never read or expected: they exercise the
                    // special handling of unobserved values.
                    let written = ["a", "b", "c", "d"][rng.below(4) as usize];
                    let (op, outcome) = match rng.below(4) {
                        0 => (put("k", written), Outcome::Done),
                        1 => (get("k"), read(value(&mut rng))),
                        2 => (
                            cas("k", value(&mut rng), written),
                            Outcome::Cas(rng.chance(50)),
                        ),
                        _ => (del("k"), Outcome::Done),
                    };
                    let unknown = rng.chance(25);
                    Operation {
                        client: c as ClientId,
                        op,
                        invoke,
                        response: (!unknown).then_some(response),
                        outcome: if unknown { Outcome::Unknown } else { outcome },
                    }
                })
                .collect();
            let h = build(&ops);
            let expected = brute_force(&ops);
            match check(&h, Budget::UNLIMITED) {
                Verdict::Linearizable => {
                    assert!(expected, "missed a violation in {ops:#?}");
                    yes += 1;
                }
                Verdict::NotLinearizable { witness, .. } => {
                    assert!(!expected, "false violation in {ops:#?}");
                    let sub: Vec<Operation> =
                        witness.iter().map(|&id| ops[id.index()].clone()).collect();
                    assert!(
                        !brute_force(&sub),
                        "witness {witness:?} is linearizable in {ops:#?}"
                    );
                    no += 1;
                }
                Verdict::Inconclusive(why) => panic!("{why}"),
            }
        }
        // Both verdicts must be exercised for the comparison to mean much.
        assert!(yes > 500 && no > 500, "{yes} linearizable, {no} not");
    }
}
