//! Offers, hot-add, sub-channels, duplicates, rescind and relid reuse.

mod common;

use common::*;
use hvemu::{ChannelState, DuplicateOffer, Faults, HostConfig, HostFaults, ViolationKind};
use hvnet_wire::vmbus::{ChannelMessage, MessageType, HV_NIC_GUID};

#[test]
fn offers_then_all_offers_delivered() {
    let mut g = Guest::new(HostConfig::default());
    let a = g.add_test_device(1, 0);
    let b = g.add_test_device(2, 0);
    assert_eq!(
        g.host.pending_messages(),
        0,
        "nothing is offered before REQUESTOFFERS"
    );
    let offers = g.boot();
    assert_eq!(offers.len(), 2);
    for (i, o) in offers.iter().enumerate() {
        assert_eq!(o.offer.if_type, HV_NIC_GUID);
        assert_eq!(o.offer.if_instance.data1.get() & 0xff, i as u32 + 1);
        assert!(o.is_primary());
        assert!(o.is_dedicated_interrupt());
        assert!(!o.monitor_allocated());
        let relid = o.child_relid.get();
        assert_eq!(relid, i as u32 + 1, "small relids from 1");
        assert_eq!(o.connection_id.get(), relid | 0x2000);
    }
    assert_eq!(g.host.device_channels(a), vec![(0, 1)]);
    assert_eq!(g.host.device_channels(b), vec![(0, 2)]);
    assert_eq!(g.host.stats().offers_sent, 2);
}

#[test]
fn hot_add_while_connected() {
    let mut g = Guest::new(HostConfig::default());
    assert!(g.boot().is_empty());
    let n = g.notified.get();
    let dev = g.add_test_device(7, 0);
    assert!(g.notified.get() > n);
    let b = g.take_one();
    let ChannelMessage::OfferChannel(o) = decode(&b) else {
        panic!()
    };
    assert_eq!(o.child_relid.get(), 1);
    assert!(
        g.take_all().is_empty(),
        "no ALLOFFERS_DELIVERED for a hot-add"
    );
    assert_eq!(g.host.device_channels(dev), vec![(0, 1)]);
}

#[test]
fn device_added_between_contact_and_request_is_offered_at_request() {
    let mut g = Guest::new(HostConfig::default());
    assert!(g.connect(hvnet_wire::vmbus::VmbusVersion::WIN10_V5_3));
    g.add_test_device(1, 0);
    assert_eq!(g.host.pending_messages(), 0);
    assert_eq!(g.request_offers().len(), 1);
}

#[test]
fn subchannels_share_the_instance_and_get_new_relids() {
    let mut g = Guest::new(HostConfig::default());
    let dev = g.add_test_device(1, 8);
    let primary = g.boot()[0];
    g.host.offer_subchannels(dev, 3);
    let subs: Vec<_> = g
        .take_all()
        .iter()
        .map(|b| match decode(b) {
            ChannelMessage::OfferChannel(o) => o,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(subs.len(), 3);
    for (i, s) in subs.iter().enumerate() {
        assert_eq!(s.sub_channel_index(), i as u16 + 1);
        assert_eq!(s.offer.if_instance, primary.offer.if_instance);
        assert_eq!(s.offer.if_type, primary.offer.if_type);
        assert_ne!(s.child_relid, primary.child_relid);
        assert_ne!(s.connection_id, primary.connection_id);
    }
    // Asking again for fewer or the same offers nothing; more offers the rest.
    g.host.offer_subchannels(dev, 2);
    assert_eq!(g.host.pending_messages(), 0);
    g.host.offer_subchannels(dev, 4);
    let more = g.take_all();
    assert_eq!(more.len(), 1);
    let ChannelMessage::OfferChannel(o) = decode(&more[0]) else {
        panic!()
    };
    assert_eq!(o.sub_channel_index(), 4);
}

#[test]
fn remove_rescinds_subchannels_then_primary_and_relids_wait_for_release() {
    let mut g = Guest::new(HostConfig::default());
    let dev = g.add_test_device(1, 8);
    g.boot();
    g.host.offer_subchannels(dev, 2);
    g.take_all();
    g.host.remove_device(dev);
    let rescinds: Vec<u32> = g
        .take_all()
        .iter()
        .map(|b| match decode(b) {
            ChannelMessage::RescindChannelOffer(r) => r.child_relid.get(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(rescinds, [3, 2, 1]);
    for r in [1, 2, 3] {
        assert_eq!(
            g.host.channel_summary(r).unwrap().state,
            ChannelState::Rescinded
        );
    }

    // A new device cannot reuse relids that are not released yet.
    g.add_test_device(2, 0);
    let b = g.take_one();
    let ChannelMessage::OfferChannel(o) = decode(&b) else {
        panic!()
    };
    assert_eq!(o.child_relid.get(), 4);

    g.release(2);
    let s = g.host.channel_summary(2).unwrap();
    assert_eq!(s.state, ChannelState::Released);
    assert_eq!(s.relid_released, 1);
    // Released relids are reused, lowest first.
    let d3 = g.add_test_device(3, 0);
    let b = g.take_one();
    let ChannelMessage::OfferChannel(o) = decode(&b) else {
        panic!()
    };
    assert_eq!(o.child_relid.get(), 2);
    assert_eq!(g.host.device_channels(d3), vec![(0, 2)]);
    g.release(1);
    g.release(3);
    assert_eq!(g.host.stats().relids_released, 3);
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn double_release_and_release_without_rescind_are_violations() {
    let mut g = Guest::new(HostConfig::default());
    let a = g.add_test_device(1, 0);
    g.add_test_device(2, 0);
    g.boot();
    g.release(2);
    assert_eq!(g.host.stats().count(ViolationKind::ReleaseNotRescinded), 1);
    assert_eq!(
        g.host.channel_summary(2).unwrap().state,
        ChannelState::Offered
    );
    g.host.remove_device(a);
    g.take_all();
    g.release(1);
    g.release(1);
    assert_eq!(g.host.stats().count(ViolationKind::ReleaseTwice), 1);
    g.release(9);
    assert_eq!(g.host.stats().count(ViolationKind::UnknownRelid), 1);
}

#[test]
fn duplicate_primary_offer_same_relid() {
    let mut g = Guest::new(HostConfig::default());
    g.host
        .add_device(test_device(1, 0).with_faults(Faults::none().duplicate_primary_offer()));
    let offers = g.boot();
    assert_eq!(offers.len(), 2);
    assert_eq!(offers[0], offers[1]);
    assert_eq!(g.host.channels().len(), 1);
}

#[test]
fn duplicate_primary_offer_new_relid_is_a_ghost() {
    let mut g = Guest::new(HostConfig::default());
    let dev =
        g.host
            .add_device(test_device(1, 0).with_faults(
                Faults::none().duplicate_primary_offer_with(DuplicateOffer::NewRelid),
            ));
    let offers = g.boot();
    assert_eq!(offers.len(), 2);
    assert_eq!(offers[0].offer.if_instance, offers[1].offer.if_instance);
    assert!(offers[1].is_primary());
    assert_ne!(offers[0].child_relid, offers[1].child_relid);
    let ghost = offers[1].child_relid.get();
    assert!(g.host.channel_summary(ghost).unwrap().duplicate);
    assert_eq!(g.host.device_channels(dev), vec![(0, 1)]);
    // Removing the device rescinds only the real primary.
    g.host.remove_device(dev);
    let msgs = g.take_all();
    assert_eq!(msgs.len(), 1);
    assert!(is_type(&msgs[0], MessageType::RESCIND_CHANNELOFFER));
    assert!(g.host.channel_summary(ghost).unwrap().state == ChannelState::Released);
}

#[test]
fn reordering_never_reorders_one_device() {
    let mut reordered_somewhere = false;
    for seed in 0..50u64 {
        let mut g = Guest::new(HostConfig {
            seed,
            faults: HostFaults::none().reorder(4),
            ..HostConfig::default()
        });
        let devs: Vec<_> = (1..=4).map(|i| g.add_test_device(i, 8)).collect();
        g.boot();
        for &d in &devs {
            g.host.offer_subchannels(d, 3);
        }
        g.host.remove_device(devs[1]);
        g.host.remove_device(devs[3]);
        let owner: std::collections::BTreeMap<u32, u32> = g
            .host
            .channels()
            .iter()
            .map(|s| (s.relid, s.device.0))
            .collect();
        let msgs = g.take_all();
        assert_eq!(msgs.len(), 4 * 3 + 2 * 4);
        // (device, event) in delivery order; devices were added with instances 1..=4.
        let events: Vec<(u32, String)> = msgs
            .iter()
            .map(|b| match decode(b) {
                ChannelMessage::OfferChannel(o) => (
                    o.offer.if_instance.data1.get() & 0xff,
                    format!("o{}", o.sub_channel_index()),
                ),
                ChannelMessage::RescindChannelOffer(r) => {
                    let relid = r.child_relid.get();
                    (owner[&relid], format!("r{relid}"))
                }
                other => panic!("{other:?}"),
            })
            .collect();
        let devices_in_order: Vec<u32> = events.iter().map(|e| e.0).collect();
        // Queue order: three sub-channel offers per device, then the rescinds.
        let fifo = [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 2, 2, 2, 2, 4, 4, 4, 4];
        reordered_somewhere |= devices_in_order != fifo;
        for inst in 1..=4u32 {
            let seq: Vec<&str> = events
                .iter()
                .filter(|e| e.0 == inst)
                .map(|e| e.1.as_str())
                .collect();
            assert_eq!(
                seq[..3],
                ["o1", "o2", "o3"],
                "seed {seed} device {inst}: {seq:?}"
            );
            let relids: Vec<u32> = seq[3..].iter().map(|s| s[1..].parse().unwrap()).collect();
            let mut desc = relids.clone();
            desc.sort_unstable_by(|a, b| b.cmp(a));
            assert_eq!(
                relids, desc,
                "sub-channels rescinded before the primary: {seq:?}"
            );
            assert_eq!(relids.len(), if inst % 2 == 0 { 4 } else { 0 });
        }
    }
    assert!(
        reordered_somewhere,
        "the window should have reordered something"
    );
}

#[test]
fn delayed_messages_need_time() {
    let mut g = Guest::new(HostConfig {
        seed: 3,
        faults: HostFaults::none().delay(10),
        ..HostConfig::default()
    });
    g.initiate(hvnet_wire::vmbus::VmbusVersion::WIN10_V5_3)
        .unwrap();
    let mut waited = 0;
    while g.host.take_message().is_none() {
        let due = g.host.next_due().expect("a delayed message");
        let n = g.notified.get();
        g.host.advance_time(due - g.host.now());
        assert!(g.notified.get() > n, "advancing to the due time notifies");
        waited += 1;
        assert!(waited < 5);
    }
    assert_eq!(g.host.pending_messages(), 0);
}
