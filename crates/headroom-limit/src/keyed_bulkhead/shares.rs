//! The bookkeeping of a keyed bulkhead: what each tenant holds, who waits, who is served next.
//!
//! Plain data behind the bulkhead's lock; every rule of the documented behaviour is applied
//! here, and nothing here awaits, allocates after build (except the wait queue growing to its
//! high-water mark) or panics on any input.

use std::cmp::Ordering;
use std::task::Waker;

use hashbrown::HashTable;
use headroom_core::metrics::{Counter, Gauge};

/// No slot: the end of a list.
const NONE: u32 = u32::MAX;
/// The slot of the overflow tenant, shared by new tenants while `max_tenants` are tracked.
const OVERFLOW: u32 = 0;
/// The overflow tenant's weight: the default class's.
const OVERFLOW_WEIGHT: u32 = 1;

/// Who holds and who waits, for every active tenant.
pub(super) struct Shares {
    capacity: u32,
    max_queued: u32,
    max_tenants: usize,
    in_use: u32,
    queued: u32,
    /// The sum of the weights of the active tenants (holding a permit or waiting).
    active_weight: u64,
    /// Slot 0 is the overflow tenant; the others are tracked tenants or free.
    tenants: Vec<Tenant>,
    /// Free tenant slots, linked through `Tenant::next_free`.
    free_tenants: u32,
    /// Tracked tenants by the hash of their name. Sized so that it rehashes in place and
    /// never reallocates.
    index: HashTable<u32>,
    /// Tenants with at least one waiter, in no particular order.
    waiting: Vec<u32>,
    waiters: Vec<Waiter>,
    /// Free waiter slots, linked through `Waiter::next`.
    free_waiters: u32,
    next_seq: u64,
    tracked_gauge: Gauge,
    overflows: Counter,
}

struct Tenant {
    hash: u64,
    weight: u32,
    held: u32,
    queued: u32,
    /// Oldest and newest waiter.
    head: u32,
    tail: u32,
    /// Where it is in `Shares::waiting` while it has waiters.
    waiting_at: u32,
    next_free: u32,
}

impl Tenant {
    fn new(hash: u64, weight: u32) -> Self {
        Self {
            hash,
            weight,
            held: 0,
            queued: 0,
            head: NONE,
            tail: NONE,
            waiting_at: NONE,
            next_free: NONE,
        }
    }

    fn is_idle(&self) -> bool {
        self.held == 0 && self.queued == 0
    }
}

struct Waiter {
    tenant: u32,
    /// Arrival order across all tenants.
    seq: u64,
    prev: u32,
    next: u32,
    state: WaitState,
    waker: Option<Waker>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WaitState {
    Waiting,
    /// Given a permit, counted in its tenant's `held`; the caller has not seen it yet.
    Granted,
    /// Refused to make room for a tenant within its share.
    Evicted,
    Free,
}

/// How a wait ended, once it has.
pub(super) enum Settled {
    /// A permit of this tenant slot is the caller's.
    Granted(u32),
    Evicted,
}

/// A caller now in the queue.
pub(super) struct Queued {
    pub(super) waiter: u32,
    /// Whether a waiter of another tenant was evicted to make room.
    pub(super) evicted: bool,
    /// That waiter's waker, to wake once the lock is released.
    pub(super) wake: Option<Waker>,
}

impl Shares {
    pub(super) fn new(
        capacity: u32,
        max_queued: u32,
        max_tenants: usize,
        tracked_gauge: Gauge,
        overflows: Counter,
    ) -> Self {
        // Every tracked tenant holds a permit or waits, and one more may be looked up while
        // everything is taken: room for that many is made now, so that a tenant's arrival
        // never allocates.
        let slots = max_tenants.min(capacity as usize + max_queued as usize + 1);
        let mut tenants = Vec::with_capacity(slots + 1);
        tenants.push(Tenant::new(0, OVERFLOW_WEIGHT));
        Self {
            capacity,
            max_queued,
            max_tenants,
            in_use: 0,
            queued: 0,
            active_weight: 0,
            tenants,
            free_tenants: NONE,
            index: HashTable::with_capacity(2 * slots),
            waiting: Vec::with_capacity((slots + 1).min(max_queued as usize)),
            waiters: Vec::with_capacity((max_queued as usize).min(1024)),
            free_waiters: NONE,
            next_seq: 0,
            tracked_gauge,
            overflows,
        }
    }

    pub(super) fn in_use(&self) -> usize {
        self.in_use as usize
    }

    pub(super) fn queued(&self) -> usize {
        self.queued as usize
    }

    pub(super) fn tracked(&self) -> usize {
        self.index.len()
    }

    /// Takes a free permit for the tenant, if any is free. None is free while anyone waits.
    pub(super) fn try_take(&mut self, hash: u64, weight: u32) -> Option<u32> {
        if self.in_use >= self.capacity {
            return None;
        }
        let slot = self.activate(hash, weight);
        self.tenants[slot as usize].held += 1;
        self.in_use += 1;
        self.count_overflow(slot);
        Some(slot)
    }

    /// Puts a caller in the queue (every permit being taken), making room by eviction when
    /// the queue is full and the rules allow it; `None` refuses the caller.
    pub(super) fn enqueue(&mut self, hash: u64, weight: u32) -> Option<Queued> {
        if self.max_queued == 0 {
            return None;
        }
        let slot = self.activate(hash, weight);
        let mut queued = Queued {
            waiter: NONE,
            evicted: false,
            wake: None,
        };
        if self.queued >= self.max_queued {
            let Some(victim) = self.victim_for(slot) else {
                self.deactivate_if_idle(slot);
                return None;
            };
            queued.evicted = true;
            queued.wake = self.evict_newest(victim);
        }
        queued.waiter = self.push_waiter(slot);
        self.count_overflow(slot);
        Some(queued)
    }

    /// Whether the wait has ended; if not, `waker` is woken when it does.
    pub(super) fn poll_wait(&mut self, waiter: u32, waker: &Waker) -> Option<Settled> {
        let settled = self.settled(waiter);
        if settled.is_none() {
            let slot = &mut self.waiters[waiter as usize].waker;
            if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *slot = Some(waker.clone());
            }
        }
        settled
    }

    /// The end of a wait, if it has ended; frees the waiter when it has.
    pub(super) fn settled(&mut self, waiter: u32) -> Option<Settled> {
        let entry = &self.waiters[waiter as usize];
        let settled = match entry.state {
            WaitState::Granted => Settled::Granted(entry.tenant),
            WaitState::Evicted => Settled::Evicted,
            WaitState::Waiting | WaitState::Free => return None,
        };
        self.free_waiter(waiter);
        Some(settled)
    }

    /// A caller gives up its wait (timed out or dropped): it leaves the queue, or gives back
    /// the permit it was granted and did not see. Returns a waker to wake after the lock.
    pub(super) fn leave(&mut self, waiter: u32) -> Option<Waker> {
        let entry = &self.waiters[waiter as usize];
        let (state, slot) = (entry.state, entry.tenant);
        match state {
            WaitState::Waiting => {
                self.unlink(waiter);
                self.free_waiter(waiter);
                self.deactivate_if_idle(slot);
                None
            }
            WaitState::Granted => {
                self.free_waiter(waiter);
                self.release(slot)
            }
            WaitState::Evicted => {
                self.free_waiter(waiter);
                None
            }
            WaitState::Free => None,
        }
    }

    /// Gives back a permit of `slot`, handing it to the next in line if anyone waits.
    /// Returns that caller's waker, to wake after the lock.
    pub(super) fn release(&mut self, slot: u32) -> Option<Waker> {
        let tenant = &mut self.tenants[slot as usize];
        tenant.held = tenant.held.saturating_sub(1);
        self.in_use = self.in_use.saturating_sub(1);
        let wake = self.grant();
        self.deactivate_if_idle(slot);
        wake
    }

    /// The slot of the tenant with this hash, made active: the tenant's own, a new one, or
    /// the overflow tenant's when `max_tenants` are tracked.
    fn activate(&mut self, hash: u64, weight: u32) -> u32 {
        let tenants = &self.tenants;
        if let Some(&slot) = self
            .index
            .find(hash, |&slot| tenants[slot as usize].hash == hash)
        {
            return slot;
        }
        let (slot, weight) = if self.index.len() < self.max_tenants {
            let slot = self.free_tenants;
            let slot = if slot == NONE {
                self.tenants.push(Tenant::new(hash, weight));
                (self.tenants.len() - 1) as u32
            } else {
                self.free_tenants = self.tenants[slot as usize].next_free;
                self.tenants[slot as usize] = Tenant::new(hash, weight);
                slot
            };
            let tenants = &self.tenants;
            self.index
                .insert_unique(hash, slot, |&slot| tenants[slot as usize].hash);
            self.tracked_gauge.increment(1.0);
            (slot, weight)
        } else if self.tenants[OVERFLOW as usize].is_idle() {
            (OVERFLOW, OVERFLOW_WEIGHT)
        } else {
            return OVERFLOW;
        };
        self.active_weight += u64::from(weight);
        slot
    }

    /// Counts an acquire charged to the overflow tenant: only once charged, as a caller
    /// refused after [`activate`](Self::activate) is charged nothing.
    fn count_overflow(&self, slot: u32) {
        if slot == OVERFLOW {
            self.overflows.increment(1);
        }
    }

    /// Forgets a tenant that holds nothing and waits for nothing, in O(1).
    fn deactivate_if_idle(&mut self, slot: u32) {
        let tenant = &self.tenants[slot as usize];
        if !tenant.is_idle() {
            return;
        }
        self.active_weight -= u64::from(tenant.weight);
        if slot == OVERFLOW {
            return;
        }
        if let Ok(entry) = self.index.find_entry(tenant.hash, |&s| s == slot) {
            entry.remove();
        }
        self.tenants[slot as usize].next_free = self.free_tenants;
        self.free_tenants = slot;
        self.tracked_gauge.decrement(1.0);
    }

    /// Whether `n` permits are within the tenant's guaranteed share,
    /// `⌊capacity × weight / active weight⌋`.
    fn within_share(&self, slot: u32, n: u32) -> bool {
        let weight = u128::from(self.tenants[slot as usize].weight);
        // n ≤ ⌊c·w / W⌋  ⇔  n·W ≤ c·w, for whole n.
        u128::from(n) * u128::from(self.active_weight) <= u128::from(self.capacity) * weight
    }

    /// Hands a free permit to the waiting tenant holding the fewest permits for its weight
    /// (ties: the one whose oldest caller came first); its oldest caller gets it.
    fn grant(&mut self) -> Option<Waker> {
        let slot = self
            .waiting
            .iter()
            .copied()
            .min_by(|&a, &b| self.serve_order(a, b))?;
        let waiter = self.tenants[slot as usize].head;
        self.unlink(waiter);
        self.tenants[slot as usize].held += 1;
        self.in_use += 1;
        let entry = &mut self.waiters[waiter as usize];
        entry.state = WaitState::Granted;
        entry.waker.take()
    }

    fn serve_order(&self, a: u32, b: u32) -> Ordering {
        let (ta, tb) = (&self.tenants[a as usize], &self.tenants[b as usize]);
        // (held + 1) / weight, compared without division.
        let lhs = (u128::from(ta.held) + 1) * u128::from(tb.weight);
        let rhs = (u128::from(tb.held) + 1) * u128::from(ta.weight);
        lhs.cmp(&rhs).then_with(|| {
            let seq = |t: &Tenant| self.waiters[t.head as usize].seq;
            seq(ta).cmp(&seq(tb))
        })
    }

    /// The tenant to lose its newest waiter so that a caller of `slot` can queue: only when
    /// the caller stays within its share, and only a tenant whose permits and waiters exceed
    /// its own share (the one with the most of them for its weight).
    fn victim_for(&self, slot: u32) -> Option<u32> {
        let tenant = &self.tenants[slot as usize];
        if !self.within_share(slot, tenant.held + tenant.queued + 1) {
            return None;
        }
        let claim = |t: &Tenant| u128::from(t.held) + u128::from(t.queued);
        // Never the caller's own tenant: within its share, it cannot be over it as well.
        let others = self.waiting.iter().copied().filter(|&t| t != slot);
        let victim = others.max_by(|&a, &b| {
            let (ta, tb) = (&self.tenants[a as usize], &self.tenants[b as usize]);
            (claim(ta) * u128::from(tb.weight))
                .cmp(&(claim(tb) * u128::from(ta.weight)))
                .then_with(|| {
                    let seq = |t: &Tenant| self.waiters[t.tail as usize].seq;
                    seq(ta).cmp(&seq(tb))
                })
        })?;
        let tenant = &self.tenants[victim as usize];
        (!self.within_share(victim, tenant.held + tenant.queued)).then_some(victim)
    }

    fn evict_newest(&mut self, slot: u32) -> Option<Waker> {
        let waiter = self.tenants[slot as usize].tail;
        self.unlink(waiter);
        let entry = &mut self.waiters[waiter as usize];
        entry.state = WaitState::Evicted;
        let wake = entry.waker.take();
        self.deactivate_if_idle(slot);
        wake
    }

    fn push_waiter(&mut self, slot: u32) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let tail = self.tenants[slot as usize].tail;
        let entry = Waiter {
            tenant: slot,
            seq,
            prev: tail,
            next: NONE,
            state: WaitState::Waiting,
            waker: None,
        };
        let waiter = if self.free_waiters == NONE {
            self.waiters.push(entry);
            (self.waiters.len() - 1) as u32
        } else {
            let waiter = self.free_waiters;
            self.free_waiters = self.waiters[waiter as usize].next;
            self.waiters[waiter as usize] = entry;
            waiter
        };
        if tail == NONE {
            self.tenants[slot as usize].head = waiter;
            self.tenants[slot as usize].waiting_at = self.waiting.len() as u32;
            self.waiting.push(slot);
        } else {
            self.waiters[tail as usize].next = waiter;
        }
        let tenant = &mut self.tenants[slot as usize];
        tenant.tail = waiter;
        tenant.queued += 1;
        self.queued += 1;
        waiter
    }

    /// Takes a waiting caller out of its tenant's queue.
    fn unlink(&mut self, waiter: u32) {
        let (slot, prev, next) = {
            let entry = &self.waiters[waiter as usize];
            (entry.tenant, entry.prev, entry.next)
        };
        if prev == NONE {
            self.tenants[slot as usize].head = next;
        } else {
            self.waiters[prev as usize].next = next;
        }
        if next == NONE {
            self.tenants[slot as usize].tail = prev;
        } else {
            self.waiters[next as usize].prev = prev;
        }
        let tenant = &mut self.tenants[slot as usize];
        tenant.queued -= 1;
        self.queued -= 1;
        if tenant.queued == 0 {
            let at = tenant.waiting_at;
            tenant.waiting_at = NONE;
            self.waiting.swap_remove(at as usize);
            if let Some(&moved) = self.waiting.get(at as usize) {
                self.tenants[moved as usize].waiting_at = at;
            }
        }
    }

    fn free_waiter(&mut self, waiter: u32) {
        let entry = &mut self.waiters[waiter as usize];
        entry.state = WaitState::Free;
        entry.waker = None;
        entry.next = self.free_waiters;
        self.free_waiters = waiter;
    }
}
