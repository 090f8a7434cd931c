//! A stand-in payment provider: fraud screening and card authorisation, 80–200 ms a call, the
//! slow part of a checkout. It keeps every charge, so the report can count double charges.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The payment provider shared by every instance.
#[derive(Debug, Default)]
pub(crate) struct Gateway {
    /// Charges by (customer, order reference): more than one is a double charge.
    charges: Mutex<HashMap<(u64, u64), u32>>,
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PaymentStats {
    pub(crate) charged: u64,
    pub(crate) double_charges: u64,
}

impl Gateway {
    /// Screens and charges one order.
    pub(crate) async fn charge(&self, customer: u64, reference: u64) {
        tokio::time::sleep(Duration::from_millis(80 + fastrand::u64(0..120))).await;
        *self
            .charges
            .lock()
            .expect("charges lock")
            .entry((customer, reference))
            .or_insert(0) += 1;
    }

    /// The counters so far.
    pub(crate) fn stats(&self) -> PaymentStats {
        let charges = self.charges.lock().expect("charges lock");
        PaymentStats {
            charged: charges.len() as u64,
            double_charges: charges.values().map(|&n| u64::from(n - 1)).sum(),
        }
    }
}
