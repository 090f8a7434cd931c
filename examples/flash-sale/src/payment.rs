//! A stand-in payment provider: fraud screening and card authorisation, 80–200 ms a call, the
//! slow part of a checkout. It keeps every charge, so the report can count double charges.
//!
//! Like real providers, it takes an optional idempotency key: a charge whose key it has seen
//! is answered without charging again. A charge is made when the request arrives, so a caller
//! that gives up waiting (or dies) has still charged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The payment provider shared by every instance.
#[derive(Debug, Default)]
pub(crate) struct Gateway {
    /// Charges by (customer, order reference): more than one is a double charge.
    charges: Mutex<HashMap<(u64, u64), u32>>,
    /// Idempotency keys seen, with the charges each one absorbed.
    keys: Mutex<HashMap<String, u32>>,
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PaymentStats {
    /// Orders charged at least once.
    pub(crate) charged: u64,
    pub(crate) double_charges: u64,
    /// Charges asked again under a key already seen: not made.
    pub(crate) repeated_charges: u64,
}

impl Gateway {
    /// Screens and charges one order; with `idempotency_key`, only the first call with that
    /// key charges.
    pub(crate) async fn charge(
        &self,
        customer: u64,
        reference: u64,
        idempotency_key: Option<&str>,
    ) {
        let first = idempotency_key.is_none_or(|key| {
            let mut keys = self.keys.lock().expect("keys lock");
            let seen = keys.entry(key.to_owned()).or_insert(0);
            *seen += 1;
            *seen == 1
        });
        if first {
            *self
                .charges
                .lock()
                .expect("charges lock")
                .entry((customer, reference))
                .or_insert(0) += 1;
        }
        tokio::time::sleep(Duration::from_millis(80 + fastrand::u64(0..120))).await;
    }

    /// The counters so far.
    pub(crate) fn stats(&self) -> PaymentStats {
        let charges = self.charges.lock().expect("charges lock");
        PaymentStats {
            charged: charges.len() as u64,
            double_charges: charges.values().map(|&n| u64::from(n - 1)).sum(),
            repeated_charges: (self.keys.lock().expect("keys lock").values())
                .map(|&n| u64::from(n - 1))
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_seen_before_does_not_charge_again_and_no_key_always_charges() {
        let gateway = Gateway::default();
        gateway.charge(1, 10, Some("order 1-10")).await;
        gateway.charge(1, 10, Some("order 1-10")).await;
        assert_eq!(gateway.stats().double_charges, 0);
        assert_eq!(gateway.stats().repeated_charges, 1);
        gateway.charge(2, 20, None).await;
        gateway.charge(2, 20, None).await;
        let stats = gateway.stats();
        assert_eq!((stats.charged, stats.double_charges), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_has_still_charged() {
        let gateway = Gateway::default();
        let cut_short =
            tokio::time::timeout(Duration::from_millis(1), gateway.charge(1, 10, None)).await;
        assert!(cut_short.is_err());
        assert_eq!(gateway.stats().charged, 1);
    }
}
