// flyproxy sk_lookup steering program, compiled at load time by bcc.
//
// For every new TCP connection (IPv4 or IPv6) the kernel asks this program which
// socket should receive it, before its normal socket lookup:
//   - destination port not in flyproxy_ports  -> SK_PASS without a socket: the
//     normal lookup runs (other services on the host are unaffected);
//   - destination port in flyproxy_ports       -> the connection is assigned to
//     its app's *lane* if one is registered: flyproxy_lanes[app index % LANES]
//     holds a member of an SO_REUSEPORT group, one socket per worker; the kernel
//     then picks the member by a hash of the connection, so workers share
//     connections evenly. Each lane is its own group, so each app (up to LANES of
//     them) has accept queues of its own: a flood on one app fills its queues,
//     not another's. Else the one group in flyproxy_group (as registered by
//     versions before lanes), else the one listener in flyproxy_listener
//     (systemd's socket; it also takes over while the proxy restarts, when the
//     groups are gone). A dual-stack listener takes both families. The proxy
//     routes by the port the client dialled;
//   - port is ours but no listener registered  -> SK_DROP. We would rather drop
//     the SYN silently (the client retransmits, and a listener being registered
//     picks it up), but sk_lookup cannot: the kernel treats SK_DROP as "no
//     socket" and TCP answers with a reset (checked on 6.18; see NOTES.md).
//     SK_DROP is still the right verdict: SK_PASS would fall through to normal
//     lookup and could hand our traffic to whatever else listens on that port.
//     The window is small in practice: systemd holds the listener, so it stays
//     registered across restarts of the proxy; only the very first start has a
//     moment between `bpf load` and `bpf register`.
//
// Maps (pinned under the state dir, updated by `flyproxy bpf sync/register`):
//   flyproxy_ports     port (host byte order) -> app index in the config
//   flyproxy_listener  one-slot sockmap holding the proxy's listening socket
//   flyproxy_lanes     LANES-slot sockmap: a member of each lane's workers' group
//   flyproxy_group     one-slot sockmap holding a member of the workers' group
//                      (before lanes; kept so an older proxy still spreads)
//   flyproxy_counters  per-CPU outcome counters (see enum below)

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#ifndef FLYPROXY_MAX_PORTS
#define FLYPROXY_MAX_PORTS 65536
#endif
#define FLYPROXY_LANES 16  // appliance/bpf/state.py LANES

// When a state dir already holds pinned maps, the loader defines
// FLYPROXY_PIN_DIR so a replacement program reuses them (no port or listener is
// lost across an upgrade of the program).
#ifdef FLYPROXY_PIN_DIR
#define FLYPROXY_TABLE(type, key, leaf, name, max) \
    BPF_TABLE_PINNED(type, key, leaf, name, max, FLYPROXY_PIN_DIR "/" #name)
#else
#define FLYPROXY_TABLE(type, key, leaf, name, max) BPF_TABLE(type, key, leaf, name, max)
#endif

enum flyproxy_counter {
    FLYPROXY_STEERED = 0,      // assigned to our listener
    FLYPROXY_NO_LISTENER = 1,  // our port, but no listener registered: refused
    FLYPROXY_ASSIGN_FAILED = 2,// bpf_sk_assign refused the listener: refused
    FLYPROXY_NCOUNTERS = 3,
};

FLYPROXY_TABLE("hash", u16, u32, flyproxy_ports, FLYPROXY_MAX_PORTS);
FLYPROXY_TABLE("sockmap", u32, u64, flyproxy_listener, 1);
FLYPROXY_TABLE("sockmap", u32, u64, flyproxy_group, 1);
FLYPROXY_TABLE("sockmap", u32, u64, flyproxy_lanes, FLYPROXY_LANES);
FLYPROXY_TABLE("percpu_array", u32, u64, flyproxy_counters, FLYPROXY_NCOUNTERS);

static __always_inline void count(u32 which)
{
    u64 *value = flyproxy_counters.lookup(&which);
    if (value)
        *value += 1;  // per-CPU slot: no atomics needed
}

int flyproxy_steer(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;

    u16 port = ctx->local_port;  // host byte order
    u32 *app = flyproxy_ports.lookup(&port);
    if (!app)
        return SK_PASS;  // not ours: normal socket lookup

    u32 lane = *app % FLYPROXY_LANES;
    struct bpf_sock *member = (struct bpf_sock *)flyproxy_lanes.lookup(&lane);
    if (member) {
        long err = bpf_sk_assign(ctx, member, 0);
        bpf_sk_release(member);
        if (!err) {
            count(FLYPROXY_STEERED);
            return SK_PASS;
        }
    }
    u32 zero = 0;
    struct bpf_sock *group = (struct bpf_sock *)flyproxy_group.lookup(&zero);
    if (group) {
        long err = bpf_sk_assign(ctx, group, 0);
        bpf_sk_release(group);
        if (!err) {
            count(FLYPROXY_STEERED);
            return SK_PASS;
        }
        // e.g. an IPv4-only group and an IPv6 client: the listener may still take it
    }
    struct bpf_sock *listener = (struct bpf_sock *)flyproxy_listener.lookup(&zero);
    if (!listener) {
        count(FLYPROXY_NO_LISTENER);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, listener, 0);
    bpf_sk_release(listener);
    if (err) {
        count(FLYPROXY_ASSIGN_FAILED);
        return SK_DROP;
    }
    count(FLYPROXY_STEERED);
    return SK_PASS;
}
