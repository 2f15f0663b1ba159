//! Acknowledges the jobs of one consumer channel in batches. Jobs finish out of order; every
//! finished job whose delivery tag lies below the oldest unfinished one is covered by a single
//! `multiple` ack, the few finished above it are acked one by one. So no finished job waits for
//! a slow one, and under load one ack frame settles tens of jobs.

use std::collections::{BTreeMap, BTreeSet};

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Acker;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How a handled job leaves its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done: its outcome (or retry copy) is safe with the broker.
    Ack,
    /// Not done: back to the queue for another try.
    Requeue,
    /// Unreadable: to the dead letters.
    Reject,
}

enum Event {
    Received(u64),
    Finished(u64, Acker, Settle),
}

/// One per consumer channel; cheap to clone.
#[derive(Clone)]
pub struct Acks {
    events: mpsc::UnboundedSender<Event>,
}

impl Acks {
    /// Starts the acking task; it ends once every `Acks` clone is dropped and the last acks
    /// are sent.
    pub fn start() -> (Acks, JoinHandle<()>) {
        let (events, received) = mpsc::unbounded_channel();
        (Acks { events }, tokio::spawn(settle(received)))
    }

    /// Called by the consumer for each delivery, in delivery order, before it is handled.
    pub fn received(&self, delivery_tag: u64) {
        let _ = self.events.send(Event::Received(delivery_tag));
    }

    pub fn finished(&self, delivery_tag: u64, acker: Acker, how: Settle) {
        let _ = self.events.send(Event::Finished(delivery_tag, acker, how));
    }
}

async fn settle(mut events: mpsc::UnboundedReceiver<Event>) {
    let mut unfinished = BTreeSet::new();
    let mut to_ack = BTreeMap::new();
    let mut batch = Vec::new();
    while events.recv_many(&mut batch, 1024).await > 0 {
        for event in batch.drain(..) {
            match event {
                Event::Received(tag) => {
                    unfinished.insert(tag);
                }
                Event::Finished(tag, acker, how) => {
                    unfinished.remove(&tag);
                    match how {
                        Settle::Ack => {
                            to_ack.insert(tag, acker);
                        }
                        // Sent before any `multiple` ack that spans the tag, which then no
                        // longer counts it as outstanding.
                        Settle::Requeue => {
                            let requeue = BasicNackOptions {
                                requeue: true,
                                ..Default::default()
                            };
                            let _ = acker.nack(requeue).await;
                        }
                        Settle::Reject => {
                            let _ = acker.reject(BasicRejectOptions { requeue: false }).await;
                        }
                    }
                }
            }
        }
        let (covering, one_by_one) = split_acks(&mut to_ack, &unfinished);
        if let Some(acker) = covering {
            let _ = acker.ack(BasicAckOptions { multiple: true }).await;
        }
        for acker in one_by_one {
            let _ = acker.ack(BasicAckOptions::default()).await;
        }
    }
}

/// Empties `finished` into the one ack that covers every finished tag below the oldest
/// unfinished one (with `multiple`), and the tags above it, to be acked one by one.
fn split_acks<A>(
    finished: &mut BTreeMap<u64, A>,
    unfinished: &BTreeSet<u64>,
) -> (Option<A>, Vec<A>) {
    let oldest_unfinished = unfinished.first().copied().unwrap_or(u64::MAX);
    let above = finished.split_off(&oldest_unfinished);
    let covering = finished.pop_last().map(|(_, acker)| acker);
    finished.clear();
    (covering, above.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ack_covers_the_finished_prefix_and_the_rest_go_one_by_one() {
        let mut finished: BTreeMap<u64, u64> = [1, 2, 3, 5, 7].map(|t| (t, t)).into();
        let unfinished = BTreeSet::from([4, 6]);
        assert_eq!(
            split_acks(&mut finished, &unfinished),
            (Some(3), vec![5, 7])
        );
        assert!(finished.is_empty());

        let mut finished: BTreeMap<u64, u64> = [8, 9].map(|t| (t, t)).into();
        assert_eq!(
            split_acks(&mut finished, &BTreeSet::new()),
            (Some(9), vec![])
        );

        let mut finished: BTreeMap<u64, u64> = [9].map(|t| (t, t)).into();
        let unfinished = BTreeSet::from([2]);
        assert_eq!(split_acks(&mut finished, &unfinished), (None, vec![9]));
    }
}
