// trace_latency.py: the system calls and scheduler events of the processes it tags
// (client, proxy, backend), in one ring buffer, timestamped on CLOCK_MONOTONIC.
struct event {
    u64 ts;    // bpf_ktime_get_ns()
    u32 tid;
    u32 who;   // the tag: 0 client, 1 proxy, 2 backend
    s32 kind;  // KIND_* below, or SYSCALL_ENTER + nr, SYSCALL_EXIT + nr
    u32 cpu;
    s64 arg;   // wakeup: target CPU; switch-out: prev_state; syscall exit: return value
};

#define KIND_WAKEUP -1
#define KIND_SWITCH_IN -2
#define KIND_SWITCH_OUT -3
#define SYSCALL_ENTER 1000
#define SYSCALL_EXIT 2000

BPF_HASH(tags, u32, u32, 64);  // tgid (or tid, for the scheduler's events) -> who
BPF_RINGBUF_OUTPUT(events, 16384);  // pages: 64 MiB, about 1.6 M events
BPF_ARRAY(dropped, u64, 1);

static inline void put(u32 tid, u32 who, s32 kind, s64 arg) {
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        int zero = 0;
        u64 *n = dropped.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
        return;
    }
    e->ts = bpf_ktime_get_ns();
    e->tid = tid;
    e->who = who;
    e->kind = kind;
    e->cpu = bpf_get_smp_processor_id();
    e->arg = arg;
    events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 *who = tags.lookup(&tgid);
    if (who)
        put((u32)id, *who, SYSCALL_ENTER + args->id, 0);
    return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 *who = tags.lookup(&tgid);
    if (who)
        put((u32)id, *who, SYSCALL_EXIT + args->id, args->ret);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup) {
    u32 pid = args->pid;
    u32 *who = tags.lookup(&pid);
    if (who)
        put(pid, *who, KIND_WAKEUP, args->target_cpu);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch) {
    u32 prev = args->prev_pid, next = args->next_pid;
    u32 *who = tags.lookup(&prev);
    if (who)
        put(prev, *who, KIND_SWITCH_OUT, args->prev_state);
    who = tags.lookup(&next);
    if (who)
        put(next, *who, KIND_SWITCH_IN, 0);
    return 0;
}
