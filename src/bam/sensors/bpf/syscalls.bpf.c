// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * BAM system-call sensor (eBPF, CO-RE; compiled against a vmlinux.h dumped from the running
 * kernel's BTF, see bam.sensors.build).
 *
 * Why it looks like this:
 *  - BTF raw tracepoints (tp_btf) on sys_enter/sys_exit: no kprobes, no tracefs needed to
 *    attach, and arguments are read straight from pt_regs without a probe_read.
 *  - The workload is selected IN THE KERNEL, before any work is done: a bitmap of watched
 *    thread-group ids (an array map: the verifier inlines its lookup, so no hash-map work per
 *    event) that follows fork() and is cleared when a thread group dies, or a cgroup v2 subtree
 *    (ancestor cgroup id). Every other process on the host pays only the tracepoint itself.
 *  - Events are staged in a per-CPU buffer and flushed to the ring buffer in chunks of
 *    STAGE_N events (or when the oldest staged event is cfg.flush_age_ns old): one ring-buffer
 *    reservation per chunk instead of per event, and no wakeup (user space polls).
 *  - Timestamps: bpf_ktime_get_ns() is a third of the per-event cost here (~24 ns of ~70, an
 *    ordered TSC read in a VM). A thread that keeps running on one CPU (same thread, no
 *    context switch, same jiffy) takes a precise stamp only every cfg.clk_run events; the
 *    events in between are stamped "previous + 1 ns". Every stamp is a lower bound of the
 *    true time, within one jiffy and cfg.clk_run calls of it; each thread's stamps strictly
 *    increase, across CPUs too (a migration needs a context switch, which forces a precise
 *    stamp). cfg.precise_ts stamps every event precisely.
 *  - Page faults (page_fault_user): totals per CPU and a per-process histogram of 2 MiB address
 *    regions in a hash map; faults that find the histogram full are counted as unbinned.
 *  - Every event that cannot be delivered is COUNTED (lost), never silently dropped.
 *  - Aggregation mode (agg_enter) keeps per-workload syscall-pair (bigram) counts per thread
 *    sequence in an array map instead of streaming events.
 *  - Network bytes (net_send/net_recv) come from the sock_send_length/sock_recv_length
 *    tracepoints, which fire in the caller's context with the byte count the socket layer
 *    actually moved, for every path into a socket (write, send*, sendmsg, splice, io_uring):
 *    per-workload counts without any per-syscall cost for the rest of the host.
 *
 * Layouts of struct event / struct detail / struct stage_hdr are mirrored by numpy dtypes in
 * bam/sensors/ebpf.py; change both together.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define STAGE_N 256
#define EXIT_FLAG 0x80000000u
#define DROP_MARK 0xffffffffu /* event.nr of a marker: arg events lost at ts */
#define NSLOT 512          /* syscall numbers kept apart in aggregation mode */
#define START_SLOT 511     /* "no previous call" row of the pair matrix */
#define OTHER_SLOT 510     /* numbers >= 510 share one slot */
#define DETAIL_DATA 256

#define PROT_EXEC 0x4
#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define MSG_PEEK 2
#define FAULT_SHIFT 21     /* page-fault histogram: 2 MiB address regions */
#define NET_CLASSES 3    /* 0: inet (v4 + v6), 1: unix, 2: other families */

enum filter_mode { FILTER_ALL = 0, FILTER_PIDS = 1, FILTER_CGROUP = 2 };

struct config {
	__u32 filter;        /* enum filter_mode */
	__u32 self_tgid;     /* the sensor itself: never traced */
	__u64 cgroup_id;     /* FILTER_CGROUP: id (inode) of the v2 cgroup */
	__u32 cgroup_level;  /* its depth below the v2 root */
	__u32 want_args;     /* selected arguments + details ring */
	__u64 flush_age_ns;  /* flush a partly filled chunk when its oldest event is this old */
	__u32 precise_ts;    /* bpf_ktime_get_ns() for every event */
	__u32 clk_run;       /* else: events per precise stamp within one thread's run */
};

/* Set by the loader before load (the .rodata map's initial value); the verifier then prunes
 * the branches of modes that are off. Must stay the only .rodata variable (offset 0). */
const volatile struct config cfg = {};

struct event {          /* 32 bytes */
	__u64 ts;            /* bpf_ktime_get_ns() */
	__u32 tgid;
	__u32 tid;
	__u32 nr;            /* syscall number; EXIT_FLAG set on exit events */
	__u32 aux;           /* mmap/mprotect: prot | flags << 8 (mmap) */
	__u64 arg;           /* enter: selected argument (byte count, length); exit: return value */
};

struct stage {
	__u32 n;             /* events staged */
	__u32 busy;          /* a program on this CPU is inside the staging section */
	__u64 first_ts;      /* time of the oldest staged event */
	__u64 seen;          /* events selected by the filter */
	__u64 lost;          /* events that could not be delivered (ring buffer full) */
	__u64 details_lost;  /* detail records that could not be delivered */
	__u64 chunks;        /* chunks flushed */
	__u64 contended;     /* events sent alone because the stage was busy (preemption) */
	__u64 faults;        /* page faults of the workload (page_fault_user) */
	__u64 faults_write;
	__u64 faults_exec;
	__u64 faults_unbinned; /* faults not in the histogram (it was full) */
	__u64 pending_lost;  /* lost events not yet reported by a DROP_MARK in the stream */
	__u64 lost_ts;       /* time of the first of them */
	__u64 clk_ts;        /* stamp of the last staged event (see event_time) */
	__u64 clk_csw;       /* its thread's context switches then */
	__u64 clk_j;         /* jiffies then */
	__u32 clk_tid;       /* its thread */
	__u32 clk_run;       /* events since the last precise stamp */
	struct event ev[STAGE_N];
};

struct detail {          /* one rare, security-relevant call with its arguments */
	__u64 ts;
	__u32 tgid;
	__u32 tid;
	__u32 nr;
	__u32 len;           /* bytes valid in data */
	__u64 args[6];
	__u8 data[DETAIL_DATA]; /* execve: path (NUL-terminated); connect/bind: sockaddr */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1); /* set by the loader: pid_max / 64 + 1 */
} watched SEC(".maps");

struct netbytes {        /* per CPU; indexed by NET_CLASSES */
	__u64 tx_bytes[NET_CLASSES];
	__u64 rx_bytes[NET_CLASSES];
	__u64 tx_calls[NET_CLASSES];
	__u64 rx_calls[NET_CLASSES];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct netbytes);
	__uint(max_entries, 1);
} net SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct stage);
	__uint(max_entries, 1);
} stage SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22); /* set by the loader */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} details SEC(".maps");

struct fault_key {
	__u32 tgid;
	__u32 pad;
	__u64 region;        /* address >> FAULT_SHIFT */
};

struct fault_val {
	__u64 n;
	__u64 write;
	__u64 exec;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct fault_key);
	__type(value, struct fault_val);
	__uint(max_entries, 1); /* set by the loader when page faults are watched */
} fault_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1); /* aggregation: pid_max (previous call + 1, per thread id) */
} prev_nr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1); /* aggregation: NSLOT * NSLOT pair counts */
} pairs SEC(".maps");

static __always_inline bool pid_watched(__u32 tgid)
{
	__u32 idx = tgid >> 6;
	__u64 *w = bpf_map_lookup_elem(&watched, &idx);
	return w && ((*w >> (tgid & 63)) & 1);
}

static __always_inline bool selected(__u32 tgid)
{
	if (cfg.filter == FILTER_PIDS)
		return pid_watched(tgid);
	if (cfg.filter == FILTER_CGROUP)
		return bpf_get_current_ancestor_cgroup_id(cfg.cgroup_level) == cfg.cgroup_id;
	return tgid != cfg.self_tgid;
}

static __always_inline void send_detail(struct pt_regs *regs, struct stage *s, __u32 tgid,
					__u32 tid, __u32 nr, __u64 now)
{
	struct detail *d = bpf_ringbuf_reserve(&details, sizeof(*d), 0);
	if (!d) {
		s->details_lost++;
		return;
	}
	d->ts = now;
	d->tgid = tgid;
	d->tid = tid;
	d->nr = nr;
	d->len = 0;
	d->args[0] = regs->di;
	d->args[1] = regs->si;
	d->args[2] = regs->dx;
	d->args[3] = regs->r10;
	d->args[4] = regs->r8;
	d->args[5] = regs->r9;
	if (nr == 59 || nr == 322) { /* execve(path, ...), execveat(dirfd, path, ...) */
		const char *path = (const char *)(nr == 59 ? regs->di : regs->si);
		long n = bpf_probe_read_user_str(d->data, DETAIL_DATA, path);
		d->len = n > 0 ? n : 0;
	} else if (nr == 42 || nr == 49) { /* connect, bind(fd, addr, addrlen) */
		__u64 alen = (__u32)regs->dx;
		if (alen > 128)
			alen = 128;
		asm volatile("" : "+r"(alen)); /* keep the clamped register for the verifier */
		if (bpf_probe_read_user(d->data, alen, (const void *)regs->si) == 0)
			d->len = alen;
	}
	bpf_ringbuf_submit(d, BPF_RB_NO_WAKEUP);
}

static __always_inline void note_lost(struct stage *s, __u64 n, __u64 ts)
{
	if (!s->pending_lost)
		s->lost_ts = ts;
	s->lost += n;
	s->pending_lost += n;
}

/* Flush n staged events as one record. A failed flush is counted and later reported IN the
 * stream (a DROP_MARK event at the time of the first lost event), so user space knows which
 * window is incomplete, not only that something was lost. */
static __always_inline void flush(struct stage *s, __u32 n)
{
	if (n > STAGE_N)
		return;
	if (s->pending_lost) {
		struct event m = { .ts = s->lost_ts, .nr = DROP_MARK, .arg = s->pending_lost };
		if (bpf_ringbuf_output(&events, &m, sizeof(m), BPF_RB_NO_WAKEUP) == 0)
			s->pending_lost = 0;
	}
	if (bpf_ringbuf_output(&events, s->ev, n * sizeof(struct event), BPF_RB_NO_WAKEUP) == 0)
		s->chunks++;
	else
		note_lost(s, n, s->first_ts);
}

/* The stamp of an event staged on this CPU (called inside the busy section). */
static __always_inline __u64 event_time(struct stage *s, __u32 tid)
{
	if (cfg.precise_ts)
		return bpf_ktime_get_ns();
	struct task_struct *t = bpf_get_current_task_btf();
	__u64 csw = t->nvcsw + t->nivcsw;
	__u64 j = bpf_jiffies64();
	if (tid == s->clk_tid && csw == s->clk_csw && j == s->clk_j && s->clk_run < cfg.clk_run) {
		/* the same thread has run here without a switch since the last stamp, which is
		 * <= that event's time: +1 ns is still <= this event's time */
		s->clk_run++;
		return ++s->clk_ts;
	}
	__u64 now = bpf_ktime_get_ns();
	s->clk_tid = tid;
	s->clk_csw = csw;
	s->clk_j = j;
	s->clk_run = 1;
	s->clk_ts = now;
	return now;
}

static __always_inline void stage_event(struct pt_regs *regs, __u32 tgid, __u32 tid, __u32 nr,
					__u64 arg, bool enter)
{
	__u32 zero = 0;
	struct stage *s = bpf_map_lookup_elem(&stage, &zero);
	if (!s)
		return;
	__u32 aux = 0;
	__u64 now;
	bool contended = s->busy;
	s->seen++;
	if (contended) {
		now = bpf_ktime_get_ns();
	} else {
		s->busy = 1;
		barrier();
		now = event_time(s, tid);
	}

	if (enter && cfg.want_args) {
		switch (nr) {
		case 0: case 1: case 17: case 18: case 44: case 45: /* read write pread pwrite sendto recvfrom */
			arg = regs->dx;
			break;
		case 9: /* mmap(addr, len, prot, flags, fd, off) */
			arg = regs->si;
			aux = (regs->dx & 0xff) | ((__u32)regs->r10 << 8);
			if (regs->dx & PROT_EXEC)
				send_detail(regs, s, tgid, tid, nr, now);
			break;
		case 10: case 329: /* mprotect, pkey_mprotect(addr, len, prot) */
			arg = regs->si;
			aux = regs->dx & 0xff;
			if (regs->dx & PROT_EXEC)
				send_detail(regs, s, tgid, tid, nr, now);
			break;
		case 59: case 322: case 42: case 49:
			send_detail(regs, s, tgid, tid, nr, now);
			break;
		}
	}

	if (contended) {
		/* Another sensor program on this CPU was preempted inside the staging section:
		 * do not touch the stage; send this one event alone. */
		struct event one = { .ts = now, .tgid = tgid, .tid = tid, .nr = nr, .aux = aux, .arg = arg };
		s->contended++;
		if (bpf_ringbuf_output(&events, &one, sizeof(one), BPF_RB_NO_WAKEUP))
			note_lost(s, 1, now);
		return;
	}
	__u32 n = s->n;
	if (n >= STAGE_N)
		n = 0; /* cannot happen; bounds the index for the verifier */
	struct event *e = &s->ev[n];
	e->ts = now;
	e->tgid = tgid;
	e->tid = tid;
	e->nr = nr;
	e->aux = aux;
	e->arg = arg;
	if (n == 0)
		s->first_ts = now;
	n++;
	if (n == STAGE_N || now - s->first_ts >= cfg.flush_age_ns) {
		flush(s, n);
		n = 0;
	}
	s->n = n;
	barrier();
	s->busy = 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(bam_sys_enter, struct pt_regs *regs, long id)
{
	__u64 pt = bpf_get_current_pid_tgid();
	if (!selected(pt >> 32))
		return 0;
	stage_event(regs, pt >> 32, (__u32)pt, (__u32)id, 0, true);
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(bam_sys_exit, struct pt_regs *regs, long ret)
{
	__u64 pt = bpf_get_current_pid_tgid();
	if (!selected(pt >> 32))
		return 0;
	stage_event(regs, pt >> 32, (__u32)pt, (__u32)regs->orig_ax | EXIT_FLAG, (__u64)ret, false);
	return 0;
}

/* Per-thread order in the ring: when a watched thread leaves this CPU, what it staged here is
 * flushed before it can run, and stage newer events, on another CPU. Without this, a migrated
 * thread's older events could wait in this CPU's stage for the next watched event here and
 * reach user space after newer ones (measured live: a few calls in 10^4, up to 150 ms late),
 * which scrambles the thread's sequence. A blocking thread's calls also become visible at
 * once instead of after flush_age_ns. The tracepoint runs in prev's context, so selected()
 * (pid bitmap or current cgroup) applies to prev. */
static __always_inline void flush_stage_now(void)
{
	__u32 zero = 0;
	struct stage *s = bpf_map_lookup_elem(&stage, &zero);
	if (!s || s->busy || s->n == 0)
		return;
	s->busy = 1;
	barrier();
	__u32 n = s->n;
	if (n > STAGE_N)
		n = STAGE_N;
	flush(s, n);
	s->n = 0;
	barrier();
	s->busy = 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(bam_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	if (selected(prev->tgid))
		flush_stage_now();
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(bam_agg_enter, struct pt_regs *regs, long id)
{
	__u64 pt = bpf_get_current_pid_tgid();
	if (!selected(pt >> 32))
		return 0;
	__u32 tid = (__u32)pt;
	__u32 *prev = bpf_map_lookup_elem(&prev_nr, &tid);
	if (!prev)
		return 0;
	__u32 nr = (__u64)id < OTHER_SLOT ? (__u32)id : OTHER_SLOT;
	__u32 p = *prev ? *prev - 1 : START_SLOT;
	__u32 idx = p * NSLOT + nr;
	__u64 *c = bpf_map_lookup_elem(&pairs, &idx);
	if (c)
		__sync_fetch_and_add(c, 1);
	*prev = nr + 1;
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(bam_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 cpid = child->pid, ctgid = child->tgid;
	__u32 *prev = bpf_map_lookup_elem(&prev_nr, &cpid);
	if (prev)
		*prev = 0; /* a new thread starts a new sequence (and pid reuse starts clean) */
	if (cfg.filter != FILTER_PIDS || cpid != ctgid)
		return 0; /* threads share their group's bit */
	__u32 idx = ctgid >> 6;
	__u64 *w = bpf_map_lookup_elem(&watched, &idx);
	if (!w)
		return 0;
	__u64 bit = 1ull << (ctgid & 63);
	if (pid_watched(parent->tgid))
		__sync_fetch_and_or(w, bit);
	else if (*w & bit)
		__sync_fetch_and_and(w, ~bit); /* a reused pid outside the workload */
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(bam_pexit, struct task_struct *p, bool group_dead)
{
	/* A watched thread's last calls: deliver them now. Its final switch-out comes after
	 * its group's bit is cleared below, so bam_switch would no longer see it as watched. */
	if (selected(p->tgid))
		flush_stage_now();
	if (cfg.filter != FILTER_PIDS || !group_dead)
		return 0;
	__u32 tgid = p->tgid;
	__u32 idx = tgid >> 6;
	__u64 *w = bpf_map_lookup_elem(&watched, &idx);
	if (w && (*w & (1ull << (tgid & 63))))
		__sync_fetch_and_and(w, ~(1ull << (tgid & 63)));
	return 0;
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(bam_pfault, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	__u64 pt = bpf_get_current_pid_tgid();
	if (!selected(pt >> 32))
		return 0;
	__u32 zero = 0;
	struct stage *s = bpf_map_lookup_elem(&stage, &zero);
	if (!s)
		return 0;
	__u64 w = (error_code >> 1) & 1, x = (error_code >> 4) & 1;
	s->faults++;
	s->faults_write += w;
	s->faults_exec += x;
	/* address-range histogram per process, in the kernel: no event per fault */
	struct fault_key k = { .tgid = pt >> 32, .region = address >> FAULT_SHIFT };
	struct fault_val *v = bpf_map_lookup_elem(&fault_hist, &k);
	if (!v) {
		struct fault_val nv = { .n = 1, .write = w, .exec = x };
		if (bpf_map_update_elem(&fault_hist, &k, &nv, BPF_NOEXIST) == 0)
			return 0;
		v = bpf_map_lookup_elem(&fault_hist, &k); /* another CPU inserted it first */
		if (!v) {
			s->faults_unbinned++;
			return 0;
		}
	}
	__sync_fetch_and_add(&v->n, 1);
	if (w)
		__sync_fetch_and_add(&v->write, 1);
	if (x)
		__sync_fetch_and_add(&v->exec, 1);
	return 0;
}

static __always_inline struct netbytes *net_slot(struct sock *sk, __u32 *cls)
{
	__u64 pt = bpf_get_current_pid_tgid();
	if (!selected(pt >> 32))
		return 0;
	__u16 fam = sk ? sk->__sk_common.skc_family : 0;
	*cls = (fam == AF_INET || fam == AF_INET6) ? 0 : fam == AF_UNIX ? 1 : 2;
	__u32 zero = 0;
	return bpf_map_lookup_elem(&net, &zero);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(bam_net_send, struct sock *sk, int ret, int flags)
{
	__u32 cls;
	if (ret <= 0)
		return 0;
	struct netbytes *c = net_slot(sk, &cls);
	if (!c || cls >= NET_CLASSES)
		return 0;
	c->tx_bytes[cls] += ret;
	c->tx_calls[cls]++;
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(bam_net_recv, struct sock *sk, int ret, int flags)
{
	__u32 cls;
	if (ret <= 0 || (flags & MSG_PEEK))
		return 0; /* a peek is read again later */
	struct netbytes *c = net_slot(sk, &cls);
	if (!c || cls >= NET_CLASSES)
		return 0;
	c->rx_bytes[cls] += ret;
	c->rx_calls[cls]++;
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
