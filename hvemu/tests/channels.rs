//! GPADLs, open/close, rescind and release accounting, step-triggered faults.

mod common;

use common::*;
use hvemu::{
    ChannelSel, ChannelState, Faults, HostConfig, MemoryViolationKind, ViolationKind,
    STATUS_UNSUCCESSFUL,
};
use hvnet_wire::vmbus::{
    gpa_range_head, ChannelMessage, GpadlBody, GpadlBodyMsg, GpadlHeader, GpadlHeaderMsg,
    MessageType, ModifyChannel, OpenChannel, VmbusVersion,
};
use hvnet_wire::U64;

fn booted(faults: Faults) -> (Guest, u32) {
    let mut g = Guest::new(HostConfig::default());
    g.host.add_device(test_device(1, 4).with_faults(faults));
    let relid = g.boot()[0].child_relid.get();
    (g, relid)
}

#[test]
fn gpadl_split_across_header_and_bodies() {
    let (mut g, relid) = booted(Faults::none());
    let pfns = g.mem.alloc_pages(60).unwrap();
    let id = g.send_gpadl(relid, &pfns);
    let b = g.take_one();
    let ChannelMessage::GpadlCreated(c) = decode(&b) else {
        panic!("{b:?}")
    };
    assert_eq!((c.gpadl.get(), c.creation_status.get()), (id, 0));
    let s = g.host.stats();
    assert_eq!(
        (s.live_gpadls, s.partial_gpadls, s.gpadls_created),
        (1, 0, 1)
    );
    assert_eq!(g.mem.pinned_pages(), 60);
    assert_eq!(g.host.channel_summary(relid).unwrap().gpadls_live, 1);

    g.teardown(relid, id);
    let b = g.take_one();
    let ChannelMessage::GpadlTorndown(t) = decode(&b) else {
        panic!()
    };
    assert_eq!(t.gpadl.get(), id);
    assert_eq!(g.mem.pinned_pages(), 0);
    let sum = g.host.channel_summary(relid).unwrap();
    assert_eq!(
        (sum.gpadls_live, sum.gpadls_created, sum.gpadls_torn_down),
        (0, 1, 1)
    );
    g.mem.free_pages(&pfns);
    assert!(g.mem.violations().is_empty());
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn gpadl_is_not_answered_until_the_last_body() {
    let (mut g, relid) = booted(Faults::none());
    let pfns = g.mem.alloc_pages(40).unwrap();
    let msgs: Vec<_> = hvnet_wire::vmbus::gpadl_messages(relid, 0x100, 0, 40 * 4096, &pfns)
        .unwrap()
        .collect();
    assert_eq!(msgs.len(), 2);
    g.host.post_message(1, 1, msgs[0].as_bytes()).unwrap();
    assert_eq!(g.host.pending_messages(), 0);
    assert_eq!(g.host.stats().partial_gpadls, 1);
    g.host.post_message(1, 1, msgs[1].as_bytes()).unwrap();
    assert!(is_type(&g.take_one(), MessageType::GPADL_CREATED));
}

fn header(relid: u32, id: u32, pages: usize, first: &[u64]) -> Vec<u8> {
    let mut words = vec![U64::new(gpa_range_head(0, (pages * 4096) as u32))];
    words.extend(first.iter().map(|&p| U64::new(p)));
    let h = GpadlHeader {
        child_relid: relid.into(),
        gpadl: id.into(),
        range_buflen: ((1 + pages) as u16 * 8).into(),
        rangecount: 1.into(),
    };
    ChannelMessage::GpadlHeader(GpadlHeaderMsg {
        header: h,
        words: &words,
    })
    .encode()
    .unwrap()
    .as_bytes()
    .to_vec()
}

fn body(id: u32, msgnumber: u32, pfns: &[u64]) -> Vec<u8> {
    let words: Vec<U64> = pfns.iter().map(|&p| U64::new(p)).collect();
    let b = GpadlBody {
        msgnumber: msgnumber.into(),
        gpadl: id.into(),
    };
    ChannelMessage::GpadlBody(GpadlBodyMsg {
        body: b,
        words: &words,
    })
    .encode()
    .unwrap()
    .as_bytes()
    .to_vec()
}

fn created_status(g: &mut Guest) -> u32 {
    let b = g.take_one();
    match decode(&b) {
        ChannelMessage::GpadlCreated(c) => c.creation_status.get(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gpadl_errors_are_counted_and_answered_where_possible() {
    let (mut g, relid) = booted(Faults::none());
    let pfns = g.mem.alloc_pages(4).unwrap();

    // A page the guest does not own: rejected.
    g.host
        .post_message(1, 1, &header(relid, 1, 2, &[pfns[0], pfns[0] + 1]))
        .unwrap();
    assert_eq!(created_status(&mut g), STATUS_UNSUCCESSFUL);
    assert_eq!(g.host.stats().count(ViolationKind::GpadlForeignPfn), 1);

    // Duplicate handle: ignored.
    g.host
        .post_message(1, 1, &header(relid, 2, 1, &[pfns[0]]))
        .unwrap();
    assert_eq!(created_status(&mut g), 0);
    g.host
        .post_message(1, 1, &header(relid, 2, 1, &[pfns[1]]))
        .unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::GpadlDuplicate), 1);
    assert_eq!(g.host.pending_messages(), 0);

    // Handle 0 and unknown relid.
    g.host
        .post_message(1, 1, &header(relid, 0, 1, &[pfns[0]]))
        .unwrap();
    g.host
        .post_message(1, 1, &header(77, 3, 1, &[pfns[0]]))
        .unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::GpadlBadHandle), 1);
    assert_eq!(g.host.stats().count(ViolationKind::UnknownRelid), 1);

    // Bodies: unknown handle, non-zero msgnumber, overflow, body after completion.
    g.host.post_message(1, 1, &body(99, 0, &[pfns[0]])).unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::GpadlUnknown), 1);
    g.host
        .post_message(1, 1, &header(relid, 4, 3, &[pfns[0]]))
        .unwrap();
    g.host.post_message(1, 1, &body(4, 1, &[pfns[1]])).unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::GpadlBodyNumber), 1);
    g.host
        .post_message(1, 1, &body(4, 0, &[pfns[2], pfns[3]]))
        .unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::GpadlOverflow), 1);
    assert_eq!(created_status(&mut g), STATUS_UNSUCCESSFUL);
    g.host.post_message(1, 1, &body(2, 0, &[pfns[2]])).unwrap();
    assert_eq!(g.host.stats().count(ViolationKind::GpadlAlreadyComplete), 1);

    // Teardown of an unknown, foreign-channel or incomplete GPADL.
    g.teardown(relid, 1234);
    assert_eq!(g.host.stats().count(ViolationKind::GpadlUnknown), 2);
    g.host
        .post_message(1, 1, &header(relid, 5, 2, &[pfns[0]]))
        .unwrap();
    g.teardown(relid, 5);
    assert_eq!(g.host.stats().count(ViolationKind::GpadlIncomplete), 1);
    assert_eq!(g.host.pending_messages(), 0);
    assert_eq!(g.host.stats().live_gpadls, 1);
    assert_eq!(g.mem.pinned_pages(), 1);
}

#[test]
fn gpadl_with_bad_range_data_is_rejected() {
    let (mut g, relid) = booted(Faults::none());
    let pfns = g.mem.alloc_pages(2).unwrap();
    // One range claiming 3 pages of bytes but carrying 2 PFNs, with buflen for 2.
    let words = [
        U64::new(gpa_range_head(0, 3 * 4096)),
        U64::new(pfns[0]),
        U64::new(pfns[1]),
    ];
    let h = GpadlHeader {
        child_relid: relid.into(),
        gpadl: 9.into(),
        range_buflen: 24.into(),
        rangecount: 1.into(),
    };
    let m = ChannelMessage::GpadlHeader(GpadlHeaderMsg {
        header: h,
        words: &words,
    })
    .encode()
    .unwrap();
    g.host.post_message(1, 1, m.as_bytes()).unwrap();
    assert_eq!(created_status(&mut g), STATUS_UNSUCCESSFUL);
    assert_eq!(g.host.stats().count(ViolationKind::GpadlBadRanges), 1);
}

#[test]
fn open_and_close() {
    let (mut g, relid) = booted(Faults::none());
    let ring = g.open(relid, 3, 5);
    let s = g.host.channel_summary(relid).unwrap();
    assert_eq!(
        (s.state, s.open_requests, s.opens),
        (ChannelState::Open, 1, 1)
    );
    g.host.with_ring(relid, |r| {
        assert_eq!(r.incoming_size(), 2 * 4096);
        assert_eq!(r.outgoing_size(), 4 * 4096);
    });
    // The ring GPADL cannot go while the channel is open.
    g.teardown(relid, ring.gpadl);
    assert_eq!(g.host.stats().count(ViolationKind::GpadlInUse), 1);
    // A second open is refused.
    g.post(&ChannelMessage::OpenChannel(OpenChannel::new(
        relid, relid, ring.gpadl, 0, 3,
    )));
    assert_eq!(g.host.stats().count(ViolationKind::OpenAlreadyOpen), 1);

    g.close(relid);
    let s = g.host.channel_summary(relid).unwrap();
    assert_eq!((s.state, s.closes), (ChannelState::Offered, 1));
    g.teardown(relid, ring.gpadl);
    assert!(is_type(&g.take_one(), MessageType::GPADL_TORNDOWN));
    g.close(relid);
    assert_eq!(g.host.stats().count(ViolationKind::CloseNotOpen), 1);
    g.mem.free_pages(&ring.pfns);
    assert_eq!(g.mem.live_pages(), 0);

    // Reopen works.
    let _ring = g.open(relid, 2, 2);
    assert_eq!(g.host.channel_summary(relid).unwrap().opens, 2);
}

fn open_status(g: &mut Guest) -> u32 {
    let b = g.take_one();
    match decode(&b) {
        ChannelMessage::OpenResult(r) => r.status.get(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_open_requests_fail() {
    let mut g = Guest::new(HostConfig::default());
    g.add_test_device(1, 0);
    g.add_test_device(2, 0);
    let offers = g.boot();
    let (a, b) = (offers[0].child_relid.get(), offers[1].child_relid.get());
    let pfns = g.mem.alloc_pages(4).unwrap();
    let ga = g.create_gpadl(a, &pfns);
    let open = |relid, gpadl, vp, off| {
        ChannelMessage::OpenChannel(OpenChannel::new(relid, relid, gpadl, vp, off))
    };

    g.post(&open(a, 0xdead, 0, 2));
    assert_eq!(open_status(&mut g), STATUS_UNSUCCESSFUL);
    g.post(&open(b, ga, 0, 2));
    assert_eq!(open_status(&mut g), STATUS_UNSUCCESSFUL);
    assert_eq!(g.host.stats().count(ViolationKind::OpenBadGpadl), 2);
    for off in [0, 1, 3, 4, 100] {
        g.post(&open(a, ga, 0, off));
        assert_eq!(open_status(&mut g), STATUS_UNSUCCESSFUL);
    }
    assert_eq!(g.host.stats().count(ViolationKind::OpenBadRingLayout), 5);
    g.post(&open(a, ga, 8, 2));
    assert_eq!(open_status(&mut g), STATUS_UNSUCCESSFUL);
    assert_eq!(g.host.stats().count(ViolationKind::OpenBadTargetVp), 1);
    // Garbage in the guest's initial ring indices (the read index the host adopts).
    g.mem.store_u32(pfns[0] * PAGE + 4, 5).unwrap();
    g.post(&open(a, ga, 0, 2));
    assert_eq!(open_status(&mut g), STATUS_UNSUCCESSFUL);
    assert_eq!(g.host.stats().count(ViolationKind::OpenBadRingIndices), 1);
    g.mem.store_u32(pfns[0] * PAGE + 4, 0).unwrap();
    g.post(&open(a, ga, 7, 2));
    assert_eq!(open_status(&mut g), 0);
    assert_eq!(g.host.channel_summary(a).unwrap().open_failures, 8);
}

#[test]
fn fail_open_and_fail_gpadl_faults() {
    let (mut g, relid) = booted(
        Faults::none()
            .fail_open(0xC000_0022)
            .fail_gpadl_on(ChannelSel::Subchannels, 7),
    );
    let ring = g.send_open(relid, 2, 2);
    assert_eq!(open_status(&mut g), 0xC000_0022);
    assert_eq!(
        g.host.channel_summary(relid).unwrap().state,
        ChannelState::Offered
    );
    g.teardown(relid, ring.gpadl);
    assert!(is_type(&g.take_one(), MessageType::GPADL_TORNDOWN));

    // fail_gpadl on sub-channels only.
    g.host.offer_subchannels(hvemu::DeviceId(1), 1);
    let b = g.take_one();
    let ChannelMessage::OfferChannel(o) = decode(&b) else {
        panic!()
    };
    let pfns = g.mem.alloc_pages(1).unwrap();
    g.send_gpadl(o.child_relid.get(), &pfns);
    assert_eq!(created_status(&mut g), 7);
    assert_eq!(g.mem.pinned_pages(), 0);
    assert!(g.host.violations().is_empty());
}

#[test]
fn never_answered_open_can_be_answered_late_or_closed() {
    let (mut g, relid) = booted(Faults::none().never_answer_open());
    let _ring = g.send_open(relid, 2, 2);
    assert_eq!(g.host.pending_messages(), 0);
    assert_eq!(
        g.host.channel_summary(relid).unwrap().state,
        ChannelState::Opening
    );
    // Nothing can signal it yet.
    let conn = g.host.channel_summary(relid).unwrap().connection_id;
    assert_eq!(
        g.host.signal_event(conn),
        Err(hvemu::status::INVALID_CONNECTION_ID)
    );
    assert!(g.host.answer_pending_open(relid, 0));
    assert_eq!(open_status(&mut g), 0);
    assert_eq!(
        g.host.channel_summary(relid).unwrap().state,
        ChannelState::Open
    );
    assert!(!g.host.answer_pending_open(relid, 0));

    // A guest that gives up sends CLOSECHANNEL: the pending open is cancelled.
    g.close(relid);
    let ring2 = g.send_open(relid, 2, 2);
    g.close(relid);
    assert!(!g.host.answer_pending_open(relid, 0));
    assert_eq!(g.host.channel_summary(relid).unwrap().closes, 2);
    let _ = ring2;
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn rescind_of_an_open_channel_then_cleanup_and_release() {
    let (mut g, relid) = booted(Faults::none());
    let ring = g.open(relid, 2, 2);
    let pfns = g.mem.alloc_pages(3).unwrap();
    let extra = g.create_gpadl(relid, &pfns);
    let dev = hvemu::DeviceId(1);
    g.host.remove_device(dev);
    assert!(is_type(&g.take_one(), MessageType::RESCIND_CHANNELOFFER));
    assert_eq!(
        g.host
            .backend_mut::<hvemu::SubchannelTestDevice>(dev)
            .unwrap()
            .counters()
            .closes,
        1
    );
    // The host no longer answers creation requests or opens on it...
    let late = g.mem.alloc_pages(1).unwrap();
    g.send_gpadl(relid, &late);
    g.post(&ChannelMessage::OpenChannel(OpenChannel::new(
        relid, relid, extra, 0, 2,
    )));
    assert_eq!(g.host.pending_messages(), 0);
    assert_eq!(
        g.host.channel_summary(relid).unwrap().ignored_after_rescind,
        2
    );
    // ...but lets the guest close and tear down so it can reclaim memory.
    g.close(relid);
    g.teardown(relid, ring.gpadl);
    g.teardown(relid, extra);
    g.teardown(relid, g.next_gpadl - 1); // the ignored one: quietly ignored
    let msgs = g.take_all();
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().all(|m| is_type(m, MessageType::GPADL_TORNDOWN)));
    g.release(relid);
    let s = g.host.channel_summary(relid).unwrap();
    assert_eq!(s.state, ChannelState::Released);
    assert_eq!(
        (
            s.opens,
            s.closes,
            s.gpadls_created,
            s.gpadls_torn_down,
            s.relid_released
        ),
        (1, 1, 2, 2, 1)
    );
    assert_eq!(g.mem.pinned_pages(), 0);
    g.mem.free_pages(&ring.pfns);
    g.mem.free_pages(&pfns);
    g.mem.free_pages(&late);
    assert_eq!(g.mem.live_pages(), 0);
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
    assert!(g.mem.violations().is_empty());
}

#[test]
fn release_drops_gpadls_the_guest_left_behind() {
    let (mut g, relid) = booted(Faults::none());
    let pfns = g.mem.alloc_pages(2).unwrap();
    g.create_gpadl(relid, &pfns);
    g.host.remove_device(hvemu::DeviceId(1));
    g.take_all();
    // Freeing pages a live GPADL references is a guest bug the memory model records.
    g.mem.free_pages(&pfns[..1]);
    assert_eq!(
        g.mem.violations()[0].kind,
        MemoryViolationKind::FreedWhilePinned
    );
    g.release(relid);
    let s = g.host.channel_summary(relid).unwrap();
    assert_eq!(s.gpadls_dropped, 1);
    assert_eq!(g.host.stats().gpadls_dropped, 1);
    assert_eq!(g.mem.pinned_pages(), 0);
}

#[test]
fn rescind_at_step_after_reply() {
    // Steps: GPADL header (1), OPENCHANNEL (2).
    let (mut g, relid) = booted(Faults::none().rescind_at_step(2));
    let _ring = g.send_open(relid, 2, 2);
    let msgs = g.take_all();
    assert_eq!(msgs.len(), 2);
    assert!(is_type(&msgs[0], MessageType::OPENCHANNEL_RESULT));
    assert!(is_type(&msgs[1], MessageType::RESCIND_CHANNELOFFER));
    assert_eq!(g.host.channel_summary(relid).unwrap().opens, 1);
}

#[test]
fn rescind_at_step_before_reply() {
    let (mut g, relid) = booted(Faults::none().rescind_before_step(2));
    let ring = g.send_open(relid, 2, 2);
    let msgs = g.take_all();
    assert_eq!(msgs.len(), 1, "the open is never answered");
    assert!(is_type(&msgs[0], MessageType::RESCIND_CHANNELOFFER));
    g.teardown(relid, ring.gpadl);
    assert!(is_type(&g.take_one(), MessageType::GPADL_TORNDOWN));
    g.release(relid);
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn rescind_during_a_multi_message_gpadl() {
    // Step 1 is the header, step 2 the first body: rescind before it.
    let (mut g, relid) = booted(Faults::none().rescind_before_step(2));
    let pfns = g.mem.alloc_pages(60).unwrap();
    let id = g.send_gpadl(relid, &pfns);
    let msgs = g.take_all();
    assert_eq!(msgs.len(), 1);
    assert!(is_type(&msgs[0], MessageType::RESCIND_CHANNELOFFER));
    assert_eq!(g.mem.pinned_pages(), 0, "an unfinished GPADL pins nothing");
    // Tearing down the half-built GPADL is allowed after the rescind.
    g.teardown(relid, id);
    assert!(is_type(&g.take_one(), MessageType::GPADL_TORNDOWN));
    g.release(relid);
    assert_eq!(g.host.stats().partial_gpadls, 0);
    assert!(g.host.violations().is_empty(), "{:?}", g.host.violations());
}

#[test]
fn modify_channel() {
    let (mut g, relid) = booted(Faults::none());
    let modify = |vp| {
        ChannelMessage::ModifyChannel(ModifyChannel {
            child_relid: relid.into(),
            target_vp: vp,
        })
    };
    g.post(&modify(1.into()));
    assert!(is_type(&g.take_one(), MessageType::MODIFYCHANNEL_RESPONSE));
    assert_eq!(g.host.stats().count(ViolationKind::ModifyInvalid), 1);
    let _ring = g.open(relid, 2, 2);
    g.post(&modify(3.into()));
    let b = g.take_one();
    let ChannelMessage::ModifyChannelResponse(r) = decode(&b) else {
        panic!()
    };
    assert_eq!(r.status.get(), 0);
    assert_eq!(g.host.channel_summary(relid).unwrap().target_vp, 3);

    // Before 5.3 there is no response.
    let mut g = Guest::new(HostConfig::default());
    g.add_test_device(1, 0);
    assert!(g.connect(VmbusVersion::WIN10_V4_1));
    let relid = g.request_offers()[0].child_relid.get();
    let _ring = g.open(relid, 2, 2);
    g.post(&ChannelMessage::ModifyChannel(ModifyChannel {
        child_relid: relid.into(),
        target_vp: 2.into(),
    }));
    assert_eq!(g.host.pending_messages(), 0);
    assert_eq!(g.host.channel_summary(relid).unwrap().target_vp, 2);
}
