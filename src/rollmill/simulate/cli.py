"""`rollmill simulate`: the scheduling simulator from the command line (docs/simulator.md)."""

from __future__ import annotations

from rollmill.config import ConfigError


def add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="predict a rollout/training schedule at cluster scale (docs/simulator.md)")
    p.add_argument("--policy", default="sync", help="sync | tail | both | async (k = 1) | kN, e.g. k2")
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128, help="rows per engine (continuous batching)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step (P)")
    p.add_argument("--group-size", type=int, default=16, help="samples per prompt (G)")
    p.add_argument("--prompt-tokens", type=float, default=512)
    p.add_argument("--lengths", default="lognormal:median=400,p99=8000,cap=8192",
                   help="fixed:N | lognormal:median=M,p99=Q,cap=C[,prompt_share=S] | empirical:RECORD.json")
    p.add_argument("--redundant", type=int, default=0, help="extra samples per group, first G kept (sync, async)")
    p.add_argument("--prompt-factor", type=float, default=1.25, help="tail batching's prompt over-provisioning")
    p.add_argument("--sample-factor", type=float, default=1.25, help="tail batching's sample over-provisioning")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the figures")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    """Simulate the policy's steps on the workload the options describe and print its figures."""
    from rollmill.simulate import Workload, assumed_gpu_latency, parse_lengths, parse_policy, simulate

    workload = Workload(prompts=args.prompts, group_size=args.group_size, engines=args.engines,
                        engine_batch_size=args.batch_size, prompt_tokens=args.prompt_tokens)
    try:
        policy = parse_policy(args.policy, redundant=args.redundant, prompt_factor=args.prompt_factor,
                              sample_factor=args.sample_factor)
        r = simulate(workload, assumed_gpu_latency(args.engines), parse_lengths(args.lengths), policy,
                     steps=args.steps, warmup=args.warmup, seed=args.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    name = f"async k={policy.k}" if policy.name == "async" else policy.name
    print(f"{name} on {args.engines} engines x {args.batch_size} rows, {args.prompts} prompts x {args.group_size} "
          f"samples per step, lengths {args.lengths}, assumed GPU-like latencies; steps {args.warmup + 1}-{args.steps}:")
    print(f"  step time                     {r.step_s:.3f} s")
    print(f"  s per trained sample          {r.s_per_sample:.5f}")
    print(f"  engine occupancy              {r.occupancy:.1%} ({r.rows_per_step:.1f} rows per decode step)")
    print(f"  learner idle                  {r.learner_idle:.1%}")
    print(f"  long rounds / deferred        {r.long_rounds:.0f} / {r.deferred:.0f}")
    print(f"  stale groups dropped          {r.stale:.0f}")
    return 0
