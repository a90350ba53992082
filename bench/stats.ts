export interface LatencyStats {
  count: number;
  perSecond: number;
  p50: number;
  p99: number;
}

export function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0;
}

export const fmt = (n: number, digits = 1) => n.toFixed(digits).padStart(9);
