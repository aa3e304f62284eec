//! Version negotiation, connection ids, UNLOAD.

mod common;

use common::*;
use hvemu::{status, HostConfig, HostFaults, ViolationKind};
use hvnet_wire::vmbus::{ChannelMessage, MessageType, VmbusVersion, VMBUS_GUEST_VERSIONS};

#[test]
fn newest_version_accepted_with_configured_message_connection_id() {
    let mut g = Guest::new(HostConfig {
        msg_conn_id: 0x0abc,
        ..HostConfig::default()
    });
    g.initiate(VmbusVersion::WIN10_V5_3).unwrap();
    assert!(g.notified.get() > 0, "queueing a message notifies");
    let b = g.take_one();
    let ChannelMessage::VersionResponse(v) = decode(&b) else {
        panic!()
    };
    assert!(v.supported());
    assert_eq!(v.connection_state, 0);
    assert_eq!(v.msg_conn_id.get(), 0x0abc);
    let info = g.host.connection().unwrap();
    assert_eq!(info.version, VmbusVersion::WIN10_V5_3);
    assert_eq!(info.message_connection_id, 0x0abc);

    // Later messages must use the returned id.
    g.conn_id = 0x0abc;
    assert!(g.request_offers().is_empty());
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn guest_falls_back_through_rejected_versions() {
    let mut g = Guest::new(HostConfig {
        versions: vec![VmbusVersion::WIN10, VmbusVersion::WIN8_1],
        ..HostConfig::default()
    });
    let mut accepted = None;
    for v in VMBUS_GUEST_VERSIONS {
        if g.connect(v) {
            accepted = Some(v);
            break;
        }
        assert!(g.host.connection().is_none());
    }
    assert_eq!(accepted, Some(VmbusVersion::WIN10));
    // Below 5.0 the field carries the version (OpenVMM) and messages go to id 1.
    assert_eq!(g.host.connection().unwrap().message_connection_id, 1);
    assert_eq!(g.conn_id, 1);
    g.request_offers();
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn pre_win10_host_rejects_connection_id_4() {
    let mut g = Guest::new(HostConfig {
        pre_win10_v5_connection_ids: true,
        ..HostConfig::default()
    });
    // Every 5.x attempt fails as a post: the guest learns to go below 5.0.
    for v in &VMBUS_GUEST_VERSIONS[..4] {
        assert_eq!(g.initiate(*v), Err(status::INVALID_CONNECTION_ID));
    }
    assert_eq!(g.host.pending_messages(), 0);
    assert!(g.connect(VmbusVersion::WIN10_V4_1));
    assert!(
        g.host.violations().is_empty(),
        "probing id 4 is not a violation"
    );
    assert_eq!(g.host.stats().posts_rejected, 4);
}

#[test]
fn version_5_on_connection_id_1_is_a_violation() {
    let mut g = Guest::new(HostConfig::default());
    let ic = hvnet_wire::vmbus::InitiateContact::new(VmbusVersion::WIN10_V5_2, 0, 2, 0, 0, 1, 2);
    g.post_on(1, &ChannelMessage::InitiateContact(ic)).unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::WrongConnectionId), 1);
    let ic = hvnet_wire::vmbus::InitiateContact::new(VmbusVersion::WIN10_V5_2, 0, 3, 0, 0, 1, 2);
    g.post_on(4, &ChannelMessage::InitiateContact(ic)).unwrap();
    let _ = g.take_all();
    assert_eq!(g.host.stats().count(ViolationKind::BadInitiateContact), 1);
}

#[test]
fn messages_must_use_the_returned_connection_id() {
    let mut g = Guest::new(HostConfig {
        msg_conn_id: 0x20,
        ..HostConfig::default()
    });
    assert!(g.connect(VmbusVersion::WIN10_V5_1));
    // Known port, wrong for this message: ignored and counted.
    g.post_on(4, &ChannelMessage::RequestOffers).unwrap();
    g.post_on(1, &ChannelMessage::RequestOffers).unwrap();
    assert_eq!(g.host.pending_messages(), 0);
    assert_eq!(g.host.stats().count(ViolationKind::WrongConnectionId), 2);
    // No port at all: the post fails.
    assert_eq!(
        g.post_on(0x77, &ChannelMessage::RequestOffers),
        Err(status::INVALID_CONNECTION_ID)
    );
    assert_eq!(g.host.stats().count(ViolationKind::UnknownConnectionId), 1);
    g.request_offers();
}

#[test]
fn messages_before_contact_are_violations() {
    let mut g = Guest::new(HostConfig::default());
    g.post_on(1, &ChannelMessage::RequestOffers).unwrap();
    g.post_on(1, &ChannelMessage::Unload).unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::NotConnected), 2);
    assert_eq!(g.host.pending_messages(), 0);
}

#[test]
fn unload_then_reconnect() {
    let mut g = Guest::new(HostConfig::default());
    g.add_test_device(1, 0);
    let offers = g.boot();
    assert_eq!(offers.len(), 1);
    let relid = offers[0].child_relid.get();
    let _ring = g.open(relid, 2, 2);
    assert_eq!(g.host.stats().live_gpadls, 1);
    g.post(&ChannelMessage::Unload);
    let b = g.take_one();
    assert!(is_type(&b, MessageType::UNLOAD_RESPONSE));
    assert!(g.host.connection().is_none());
    let s = g.host.stats();
    assert_eq!(s.live_gpadls, 0);
    assert_eq!(s.gpadls_dropped, 1);
    assert_eq!(g.mem.pinned_pages(), 0);
    // The same device is offered again (same small relid) after a new contact.
    let offers = g.boot();
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].child_relid.get(), relid);
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn contact_while_connected_resets_implicitly() {
    let mut g = Guest::new(HostConfig::default());
    g.add_test_device(1, 0);
    g.boot();
    assert!(g.connect(VmbusVersion::WIN10_V5_3));
    assert_eq!(g.host.stats().implicit_resets, 1);
    assert_eq!(g.request_offers().len(), 1);
}

#[test]
fn posts_are_checked_like_the_hypervisor_does() {
    let mut g = Guest::new(HostConfig::default());
    assert_eq!(
        g.host.post_message(1, 1, &[0u8; 241]),
        Err(status::INVALID_PARAMETER)
    );
    assert_eq!(
        g.host
            .post_message(1, 0x8000_0001, &[3, 0, 0, 0, 0, 0, 0, 0]),
        Err(status::INVALID_PARAMETER)
    );
    assert_eq!(g.host.post_message(1, 2, &[3, 0, 0, 0, 0, 0, 0, 0]), Ok(()));
    assert_eq!(g.host.post_message(1, 1, &[1, 2]), Ok(()));
    // Trailing bytes are tolerated (and processed) but reported.
    assert!(g.connect(VmbusVersion::WIN10_V5_3));
    let mut long = ChannelMessage::RequestOffers
        .encode()
        .unwrap()
        .as_bytes()
        .to_vec();
    long.extend_from_slice(&[0; 8]);
    g.host.post_message(1, 1, &long).unwrap();
    assert!(is_type(&g.take_one(), MessageType::ALLOFFERS_DELIVERED));
    let s = g.host.stats();
    assert_eq!(s.count(ViolationKind::Overlong), 1);
    assert_eq!(s.count(ViolationKind::PayloadTooLong), 1);
    assert_eq!(s.count(ViolationKind::ReservedMessageType), 1);
    assert_eq!(s.count(ViolationKind::NotVmbusMessage), 1);
    assert_eq!(s.count(ViolationKind::Malformed), 1);
}

#[test]
fn busy_posts_fail_then_succeed() {
    let mut g = Guest::new(HostConfig {
        faults: HostFaults::none().busy_posts(2),
        ..HostConfig::default()
    });
    assert_eq!(
        g.initiate(VmbusVersion::WIN10_V5_3),
        Err(status::INSUFFICIENT_BUFFERS)
    );
    assert_eq!(
        g.initiate(VmbusVersion::WIN10_V5_3),
        Err(status::INSUFFICIENT_BUFFERS)
    );
    assert!(g.connect(VmbusVersion::WIN10_V5_3));
}

#[test]
fn guest_sending_host_messages_is_a_violation() {
    let mut g = Guest::new(HostConfig::default());
    g.boot();
    g.post(&ChannelMessage::AllOffersDelivered);
    g.post(&ChannelMessage::UnloadResponse);
    assert_eq!(g.host.stats().count(ViolationKind::HostOnlyMessage), 2);
    g.post(&ChannelMessage::RequestOffers);
    assert_eq!(
        g.host.stats().count(ViolationKind::OffersAlreadyRequested),
        1
    );
}
