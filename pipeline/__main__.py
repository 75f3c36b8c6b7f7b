def main() -> None:
    raise SystemExit("pipeline not built yet")
