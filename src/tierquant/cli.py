def main():
    raise SystemExit("tierquant CLI: under construction")
