import unittest

from points import earned, tier_of

TIERS = {"silver": 500, "gold": 2000}


class PointsTest(unittest.TestCase):
    def test_whole_units_earn_points(self):
        self.assertEqual(earned(45999, 1), 459)
        self.assertEqual(earned(99, 1), 0)
        self.assertEqual(earned(1000, 3), 30)

    def test_negative_amounts_are_refused(self):
        with self.assertRaises(ValueError):
            earned(-1, 1)

    def test_the_highest_reached_tier_wins(self):
        self.assertIsNone(tier_of(499, TIERS))
        self.assertEqual(tier_of(500, TIERS), "silver")
        self.assertEqual(tier_of(2500, TIERS), "gold")


if __name__ == "__main__":
    unittest.main()
